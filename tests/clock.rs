//! A bus on a manual clock: retries, delayed publishes, breakers and stalls run when the test
//! moves the clock, and `flush` says when only the clock can make progress.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::{Keyed, Numbered, WAIT};
use microbus::testing::ManualClock;
use microbus::{
    BreakerState, Bus, CircuitBreaker, Context, DeadLetterReason, HandlerError, HandlerResult,
    Publish, RetryPolicy, SubscribeOptions,
};

const SECOND: Duration = Duration::from_secs(1);

fn numbered(seq: u64) -> Numbered {
    Numbered { publisher: 0, seq }
}

#[test]
fn the_default_policy_runs_four_attempts_and_dead_letters_as_the_clock_moves() {
    let wall = Instant::now();
    let clock = ManualClock::new();
    let start = clock.now();
    let bus = Bus::builder().workers(2).clock(&clock).build().unwrap();
    let attempts = Arc::new(Mutex::new(Vec::new()));
    {
        let (attempts, clock) = (attempts.clone(), clock.clone());
        bus.subscribe(move |_: &Numbered, ctx: &Context| -> HandlerResult {
            attempts
                .lock()
                .unwrap()
                .push((ctx.attempt(), clock.elapsed()));
            Err(HandlerError::msg("gateway down"))
        })
        .unwrap();
    }
    let id = bus.publish(numbered(1)).unwrap();
    assert_eq!(id.published_at(), start, "ids carry the clock's time");
    clock.advance(Duration::ZERO).unwrap();
    assert_eq!(*attempts.lock().unwrap(), [(1, Duration::ZERO)]);
    let waiting = bus.flush(WAIT).unwrap_err();
    assert!(waiting.is_waiting_on_clock(), "{waiting}");
    assert_eq!(waiting.pending().unwrap().next_due_in, Some(5 * SECOND));
    assert!(waiting.to_string().contains("manual clock"), "{waiting}");

    clock.advance(4 * SECOND).unwrap();
    assert_eq!(attempts.lock().unwrap().len(), 1, "not before its time");
    clock.advance(SECOND).unwrap();
    assert_eq!(attempts.lock().unwrap()[1], (2, 5 * SECOND));
    // Both remaining retries fall due within one advance: each at its own instant.
    clock.advance(Duration::from_secs(60)).unwrap();
    assert_eq!(
        *attempts.lock().unwrap(),
        [
            (1, Duration::ZERO),
            (2, 5 * SECOND),
            (3, 15 * SECOND),
            (4, 35 * SECOND)
        ]
    );
    bus.flush(WAIT).unwrap();
    let letters = bus.dead_letters().list();
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.attempts(), 4);
    assert_eq!(letter.reason(), DeadLetterReason::RetriesExhausted);
    assert_eq!(letter.first_failure(), start);
    assert_eq!(letter.last_failure(), start + Duration::from_secs(35));
    let stats = bus.stats();
    assert_eq!(
        (stats.failed, stats.retried, stats.dead_lettered),
        (4, 3, 1)
    );
    assert_eq!(clock.elapsed(), Duration::from_secs(65));
    eprintln!(
        "four attempts over 35 s of clock time took {:?} of wall time",
        wall.elapsed()
    );
}

/// A small generator, so that the test repeats.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % below
    }
}

#[test]
fn delayed_publishes_run_once_each_never_early_and_in_due_order_per_key() {
    let clock = ManualClock::new();
    let bus = Bus::builder().workers(2).clock(&clock).build().unwrap();
    let handled = Arc::new(Mutex::new(Vec::new()));
    {
        let (handled, clock) = (handled.clone(), clock.clone());
        bus.subscribe(move |k: &Keyed, _: &Context| -> HandlerResult {
            handled
                .lock()
                .unwrap()
                .push((k.key, k.seq, clock.elapsed()));
            Ok(())
        })
        .unwrap();
    }
    let mut rng = Lcg(7);
    let mut due = HashMap::new();
    for seq in 0..1_000u64 {
        let key = rng.next(8);
        let delay = Duration::from_millis(rng.next(3_600_000));
        due.insert(seq, delay);
        bus.publish_with(Keyed { key, seq }, Publish::new().key(key).delay(delay))
            .unwrap();
    }
    let mut steps = 0;
    while clock.elapsed() < Duration::from_secs(3_601) {
        clock
            .advance(Duration::from_millis(1 + rng.next(120_000)))
            .unwrap();
        steps += 1;
        // Everything due has run by the time `advance` returns.
        let now = clock.elapsed();
        let ran = handled.lock().unwrap().len();
        let should = due.values().filter(|d| **d <= now).count();
        assert_eq!(ran, should, "after advancing to {now:?}");
    }
    bus.flush(WAIT).unwrap();
    let handled = handled.lock().unwrap();
    assert_eq!(handled.len(), 1_000);
    let mut seen = vec![false; 1_000];
    let mut last_due: HashMap<u64, Duration> = HashMap::new();
    for &(key, seq, at) in handled.iter() {
        assert!(!seen[seq as usize], "event {seq} handled twice");
        seen[seq as usize] = true;
        let due = due[&seq];
        assert!(at >= due, "event {seq} handled at {at:?}, due at {due:?}");
        assert!(at < due + Duration::from_millis(2), "event {seq} ran late");
        let last = last_due.entry(key).or_default();
        assert!(due >= *last, "key {key}: due {due:?} ran after {last:?}");
        *last = due;
    }
    assert!(steps > 30, "{steps} steps");
}

#[test]
fn a_breaker_cools_down_and_half_opens_on_the_clock() {
    let clock = ManualClock::new();
    let bus = Bus::builder().workers(1).clock(&clock).build().unwrap();
    let down = Arc::new(AtomicBool::new(true));
    let calls = Arc::new(Mutex::new(Vec::new()));
    let changes = Arc::new(Mutex::new(Vec::new()));
    let breaker = {
        let changes = changes.clone();
        CircuitBreaker::new(3, 10 * SECOND).on_change(move |change| {
            changes.lock().unwrap().push((change.to, change.cool_down));
        })
    };
    {
        let (down, calls, clock) = (down.clone(), calls.clone(), clock.clone());
        bus.subscribe_with(
            SubscribeOptions::new()
                .retry(RetryPolicy::fixed(SECOND).max_attempts(10))
                .circuit_breaker(breaker),
            move |n: &Numbered, ctx: &Context| -> HandlerResult {
                calls
                    .lock()
                    .unwrap()
                    .push((n.seq, ctx.attempt(), clock.elapsed()));
                if down.load(Ordering::SeqCst) {
                    Err(HandlerError::msg("down"))
                } else {
                    Ok(())
                }
            },
        )
        .unwrap();
    }
    for seq in 0..10 {
        bus.publish(numbered(seq)).unwrap();
    }
    clock.advance(Duration::ZERO).unwrap();
    // Three failures open it; the other seven park.
    assert_eq!(calls.lock().unwrap().len(), 3);
    let metrics = bus.metrics();
    assert_eq!(metrics.handlers[0].breaker, Some(BreakerState::Open));
    // The retries falling due at 1 s park too: nothing runs during the cool-down.
    clock.advance(9 * SECOND).unwrap();
    assert_eq!(calls.lock().unwrap().len(), 3);
    let waiting = bus.flush(WAIT).unwrap_err();
    assert!(waiting.is_waiting_on_clock(), "{waiting}");
    assert_eq!(waiting.pending().unwrap().next_due_in, Some(SECOND));
    // At 10 s it half-opens; the probe fails; it reopens for 20 s.
    clock.advance(SECOND).unwrap();
    assert_eq!(calls.lock().unwrap().len(), 4);
    assert_eq!(calls.lock().unwrap()[3].2, 10 * SECOND);
    down.store(false, Ordering::SeqCst);
    clock.advance(19 * SECOND).unwrap();
    assert_eq!(
        calls.lock().unwrap().len(),
        4,
        "open for 20 s after a failed probe"
    );
    clock.advance(SECOND).unwrap();
    bus.flush(WAIT).unwrap();
    let calls = calls.lock().unwrap();
    assert_eq!(calls.len(), 14, "{calls:?}");
    assert!(calls[4..].iter().all(|c| c.2 == 30 * SECOND));
    let mut succeeded: Vec<u64> = calls[4..].iter().map(|c| c.0).collect();
    succeeded.sort_unstable();
    assert_eq!(succeeded, (0..10).collect::<Vec<_>>());
    // Changes are reported on the bus's report thread, which `advance` does not wait for.
    let deadline = Instant::now() + WAIT;
    while changes.lock().unwrap().len() < 5 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let changes = changes.lock().unwrap();
    assert_eq!(
        *changes,
        [
            (BreakerState::Open, Some(10 * SECOND)),
            (BreakerState::HalfOpen, None),
            (BreakerState::Open, Some(20 * SECOND)),
            (BreakerState::HalfOpen, None),
            (BreakerState::Closed, None),
        ]
    );
    assert_eq!(bus.stats().dead_lettered, 0);
}

#[test]
fn a_handler_running_long_is_reported_as_stalled_in_clock_time_and_not_waited_for() {
    let clock = ManualClock::new();
    let stalls = Arc::new(Mutex::new(Vec::new()));
    let bus = {
        let stalls = stalls.clone();
        Bus::builder()
            .workers(1)
            .clock(&clock)
            .stall_after(Duration::from_secs(60))
            .on_stall(move |stall| stalls.lock().unwrap().push(stall.running_for))
            .build()
            .unwrap()
    };
    let (release_tx, release_rx) = crossbeam_channel::bounded::<()>(1);
    let (started_tx, started_rx) = crossbeam_channel::bounded::<()>(1);
    bus.subscribe(move |_: &Numbered, _: &Context| -> HandlerResult {
        started_tx.send(()).unwrap();
        release_rx.recv().unwrap();
        Ok(())
    })
    .unwrap();
    bus.publish(numbered(0)).unwrap();
    started_rx.recv_timeout(WAIT).unwrap();
    // `advance` does not wait for the handler that was running when it began.
    clock.advance(Duration::from_secs(59)).unwrap();
    assert_eq!(bus.stats().stalled, 0);
    clock.advance(Duration::from_secs(2)).unwrap();
    let deadline = Instant::now() + WAIT;
    while stalls.lock().unwrap().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(bus.stats().stalled, 1);
    let running_for = stalls.lock().unwrap()[0];
    assert!(running_for >= Duration::from_secs(60) && running_for <= Duration::from_secs(61));
    release_tx.send(()).unwrap();
    bus.flush(WAIT).unwrap();
}

#[test]
fn advancing_from_a_handler_is_an_error_and_handler_deadlines_read_the_clock() {
    let clock = ManualClock::new();
    let bus = Bus::builder().workers(1).clock(&clock).build().unwrap();
    let seen = Arc::new(Mutex::new(None));
    {
        let (seen, clock) = (seen.clone(), clock.clone());
        bus.subscribe_with(
            SubscribeOptions::new().timeout(Duration::from_secs(5)),
            move |_: &Numbered, ctx: &Context| -> HandlerResult {
                let refused = clock.advance(SECOND).unwrap_err();
                *seen.lock().unwrap() = Some((
                    refused.to_string(),
                    ctx.is_expired(),
                    ctx.deadline()
                        .map(|d| d.duration_since(Instant::now() - SECOND)),
                ));
                Ok(())
            },
        )
        .unwrap();
    }
    bus.publish(numbered(0)).unwrap();
    bus.flush(WAIT).unwrap();
    let (refused, expired, _) = seen.lock().unwrap().take().unwrap();
    assert!(refused.contains("from a handler"), "{refused}");
    assert!(!expired);
    assert_eq!(clock.elapsed(), Duration::ZERO, "the clock did not move");
}

#[test]
fn flush_waits_as_usual_for_what_no_clock_holds_and_shutdown_does_not_wait_for_the_clock() {
    let clock = ManualClock::new();
    let bus = Bus::builder().workers(2).clock(&clock).build().unwrap();
    let handled = Arc::new(AtomicU32::new(0));
    {
        let handled = handled.clone();
        bus.subscribe(move |_: &Numbered, _: &Context| -> HandlerResult {
            handled.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
    }
    for seq in 0..1_000 {
        bus.publish(numbered(seq)).unwrap();
    }
    // Nothing of this waits on the clock: flush waits for it without an advance.
    bus.flush(WAIT).unwrap();
    assert_eq!(handled.load(Ordering::SeqCst), 1_000);
    bus.publish_with(
        numbered(1_000),
        Publish::new().delay(Duration::from_secs(3_600)),
    )
    .unwrap();
    let started = SystemTime::now();
    let report = bus.shutdown_timeout(Duration::MAX).unwrap();
    assert!(
        started.elapsed().unwrap() < WAIT,
        "shutdown does not wait for a clock nobody moves"
    );
    assert!(report.is_balanced(), "{report}");
    assert_eq!(
        report.stats.left + report.stats.dead_lettered,
        1,
        "{report}"
    );
    assert_eq!(report.stats.delivered, 1_001);
}

/// Orders → payments (fails twice, then succeeds) → shipping and notifications, on one
/// worker and a manual clock: the handler sequence and the trace's shape.
fn run_the_flow() -> (Vec<String>, Vec<String>) {
    // A fixed start: the times in ids repeat too (the ids themselves do not).
    let clock =
        ManualClock::starting_at(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
    let bus = Bus::builder()
        .workers(1)
        .clock(&clock)
        .trace_capacity(1_000)
        .build()
        .unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    // Subscribes `service`'s handler `name`, which logs each call, then runs `then`.
    fn on<E: microbus::Event>(
        bus: &Bus,
        log: &Arc<Mutex<Vec<String>>>,
        (service, name): (&str, &str),
        then: impl Fn(&E, &Context) -> HandlerResult + Send + Sync + 'static,
    ) {
        let log = log.clone();
        bus.service(service)
            .unwrap()
            .subscribe_with(
                SubscribeOptions::new().named(name),
                move |e: &E, ctx: &Context| -> HandlerResult {
                    log.lock().unwrap().push(format!(
                        "{}/{} {} {} #{} published at {:?}",
                        ctx.service(),
                        ctx.handler_name(),
                        E::NAME,
                        serde_json::to_string(e).unwrap(),
                        ctx.attempt(),
                        ctx.event_id()
                            .published_at()
                            .duration_since(SystemTime::UNIX_EPOCH)
                            .unwrap()
                    ));
                    then(e, ctx)
                },
            )
            .unwrap();
    }
    on(&bus, &log, ("payments", "charge"), |n: &Numbered, ctx| {
        if n.seq.is_multiple_of(2) && ctx.attempt() < 3 {
            return Err(HandlerError::msg("gateway down"));
        }
        ctx.publish_with(Keyed { key: n.seq, seq: 1 }, Publish::new().key(n.seq))?;
        Ok(())
    });
    on(&bus, &log, ("shipping", "ship"), |k: &Keyed, ctx| {
        ctx.publish(common::FollowUp {
            parent: k.key,
            index: 0,
        })?;
        Ok(())
    });
    on(
        &bus,
        &log,
        ("notifications", "email"),
        |_: &Keyed, _| Ok(()),
    );
    on(
        &bus,
        &log,
        ("notifications", "shipped"),
        |_: &common::FollowUp, _| Ok(()),
    );
    let orders = bus.service("orders").unwrap();
    let mut ids = Vec::new();
    for seq in 0..4 {
        ids.push(orders.publish(numbered(seq)).unwrap());
    }
    clock.advance(Duration::from_secs(60)).unwrap();
    bus.flush(WAIT).unwrap();
    let mut path = Vec::new();
    for id in ids {
        path.extend(bus.trace(id).path());
    }
    let log = log.lock().unwrap().clone();
    (log, path)
}

#[test]
fn the_same_flow_twice_on_one_worker_and_a_manual_clock_runs_the_same_way() {
    let (first_log, first_path) = run_the_flow();
    assert_eq!(first_log.len(), 4 + 2 * 2 + 4 * 3);
    assert_eq!(
        first_log[..3],
        [
            r#"payments/charge Numbered {"publisher":0,"seq":0} #1 published at 1700000000s"#,
            r#"payments/charge Numbered {"publisher":0,"seq":1} #1 published at 1700000000s"#,
            r#"payments/charge Numbered {"publisher":0,"seq":2} #1 published at 1700000000s"#,
        ]
    );
    // Order 0's third attempt, 15 s on: what it publishes carries that time.
    assert!(
        first_log.contains(
            &r#"shipping/ship Keyed {"key":0,"seq":1} #1 published at 1700000015s"#.to_owned()
        ),
        "{first_log:#?}"
    );
    for _ in 0..3 {
        let (log, path) = run_the_flow();
        assert_eq!(log, first_log);
        assert_eq!(path, first_path);
    }
    let order_0: Vec<&str> = first_path[..7].iter().map(String::as_str).collect();
    assert_eq!(
        order_0,
        [
            "Numbered from orders: payments/charge #1: failed: gateway down",
            "Numbered from orders: payments/charge #2: failed: gateway down",
            "Numbered from orders: payments/charge #3: ok",
            "  Keyed from payments: shipping/ship #1: ok",
            "  Keyed from payments: notifications/email #1: ok",
            "    FollowUp from shipping: notifications/shipped #1: ok",
            "Numbered from orders: payments/charge #1: ok",
        ]
    );
}

#[test]
fn a_delayed_event_nobody_hears_is_recorded_by_the_time_advance_returns() {
    let clock = ManualClock::new();
    let bus = Bus::builder().workers(2).clock(&clock).build().unwrap();
    let recorded = bus.record::<Numbered>();
    for seq in 0..100 {
        bus.publish_with(numbered(seq), Publish::new().delay(SECOND))
            .unwrap();
    }
    // Tracked, it completes at once: nothing is to be delivered.
    let tracker = bus
        .publish_with(numbered(100), Publish::new().delay(SECOND).tracked())
        .unwrap();
    assert!(tracker.completion().is_some());
    clock.advance(Duration::from_millis(999)).unwrap();
    assert!(recorded.is_empty(), "shown to the taps when it falls due");
    clock.advance(Duration::from_millis(1)).unwrap();
    assert_eq!(recorded.len(), 101);
    assert_eq!(bus.stats().unmatched, 101);
}

#[test]
fn advance_returns_while_a_handler_that_was_running_holds_its_worker_and_a_release() {
    let clock = ManualClock::new();
    let bus = Bus::builder().workers(1).clock(&clock).build().unwrap();
    let (started_tx, started) = crossbeam_channel::unbounded::<()>();
    let (release, released) = crossbeam_channel::unbounded::<()>();
    bus.subscribe(move |_: &Keyed, _: &Context| -> HandlerResult {
        started_tx.send(()).unwrap();
        released.recv().unwrap();
        Ok(())
    })
    .unwrap();
    let handled = Arc::new(AtomicU32::new(0));
    let paused = {
        let handled = handled.clone();
        bus.subscribe(move |_: &Numbered, _: &Context| -> HandlerResult {
            handled.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap()
    };
    paused.pause();
    for seq in 0..3 {
        bus.publish(numbered(seq)).unwrap();
    }
    clock.advance(Duration::ZERO).unwrap();
    assert_eq!(bus.metrics().handlers[1].parked, 3);
    bus.publish(Keyed { key: 0, seq: 0 }).unwrap();
    started.recv_timeout(WAIT).unwrap();
    // The release waits behind the blocked handler; advance does not wait for either.
    paused.resume();
    clock.advance(SECOND).unwrap();
    assert_eq!(handled.load(Ordering::SeqCst), 0);
    release.send(()).unwrap();
    bus.flush(WAIT).unwrap();
    assert_eq!(handled.load(Ordering::SeqCst), 3);
}

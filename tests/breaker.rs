//! Circuit breakers: a gateway that goes down and comes back loses nothing with a breaker (no
//! dead letter, no attempt spent while open, every delivery once), and dead-letters without
//! one; state changes are counted, shown and reported.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Keyed, WAIT};
use microbus::{
    BreakerChange, BreakerState, Bus, CircuitBreaker, Context, HandlerError, HandlerResult,
    Publish, RetryPolicy, SubscribeError, SubscribeOptions,
};

const EVENTS: u64 = 2_000;
const KEYS: u64 = 16;
const OUTAGE: Duration = Duration::from_millis(100);

/// What the gateway's handler saw: each success as (key, seq, attempt), and every call.
#[derive(Default)]
struct Gateway {
    down: AtomicBool,
    calls: AtomicU64,
    failed_calls: AtomicU64,
    succeeded: Mutex<Vec<(u64, u64, u32)>>,
}

fn run(breaker: Option<CircuitBreaker>) -> (Bus, Arc<Gateway>, Vec<BreakerChange>) {
    let bus = Bus::builder()
        .workers(2)
        .retry(RetryPolicy::fixed(Duration::from_millis(2)).max_attempts(3))
        .build()
        .unwrap();
    let gateway = Arc::new(Gateway::default());
    gateway.down.store(true, Ordering::SeqCst);
    let changes = Arc::new(Mutex::new(Vec::new()));
    let mut options = SubscribeOptions::new().named("charge");
    if let Some(breaker) = breaker {
        let changes = changes.clone();
        options = options.circuit_breaker(
            breaker.on_change(move |change| changes.lock().unwrap().push(change.clone())),
        );
    }
    {
        let gateway = gateway.clone();
        bus.subscribe_with(options, move |k: &Keyed, ctx: &Context| -> HandlerResult {
            gateway.calls.fetch_add(1, Ordering::SeqCst);
            if gateway.down.load(Ordering::SeqCst) {
                gateway.failed_calls.fetch_add(1, Ordering::SeqCst);
                return Err(HandlerError::msg("gateway down"));
            }
            gateway
                .succeeded
                .lock()
                .unwrap()
                .push((k.key, k.seq, ctx.attempt()));
            Ok(())
        })
        .unwrap();
    }
    let publish = |seqs: std::ops::Range<u64>| {
        for seq in seqs {
            bus.publish_with(
                Keyed {
                    key: seq % KEYS,
                    seq,
                },
                Publish::keyed(seq % KEYS),
            )
            .unwrap();
        }
    };
    publish(0..EVENTS / 2);
    // The outage itself: the gateway stays down a while after the first half was published,
    // longer than the retry policy's three attempts take.
    std::thread::sleep(OUTAGE);
    gateway.down.store(false, Ordering::SeqCst);
    publish(EVENTS / 2..EVENTS);
    bus.flush(WAIT).unwrap();
    // The reports run on threads of their own: wait for the last one (a close) to arrive.
    let start = Instant::now();
    let closed = |c: &Vec<BreakerChange>| c.last().is_none_or(|c| c.to == BreakerState::Closed);
    while !closed(&changes.lock().unwrap()) {
        assert!(start.elapsed() < WAIT, "the breaker never reported closing");
        std::thread::yield_now();
    }
    let changes = changes.lock().unwrap().clone();
    (bus, gateway, changes)
}

#[test]
fn with_a_breaker_a_gateway_outage_loses_nothing_and_spends_no_attempt_while_open() {
    let (bus, gateway, changes) = run(Some(
        CircuitBreaker::new(5, Duration::from_millis(5)).max_cool_down(Duration::from_millis(40)),
    ));
    let stats = bus.stats();
    assert_eq!(stats.dead_lettered, 0, "{stats:?}");
    assert_eq!(stats.succeeded, EVENTS);
    let succeeded = gateway.succeeded.lock().unwrap();
    assert_eq!(
        succeeded.len() as u64,
        EVENTS,
        "each delivery succeeded once"
    );
    let mut once: Vec<u64> = succeeded.iter().map(|s| s.1).collect();
    once.sort_unstable();
    assert_eq!(once, (0..EVENTS).collect::<Vec<_>>());
    // Only the attempts that failed before the breaker opened were retried: a retry that fell
    // due while it was open parked, and a failed probe spends no attempt.
    let retried_ones = succeeded.iter().filter(|s| s.2 == 2).count() as u64;
    assert!(
        succeeded.iter().all(|s| s.2 <= 2),
        "an attempt was spent while open"
    );
    assert_eq!(stats.retried, retried_ones);
    let probes = gateway.failed_calls.load(Ordering::SeqCst) - stats.retried;
    assert_eq!(stats.failed, stats.retried + probes);
    assert_eq!(
        gateway.calls.load(Ordering::SeqCst),
        EVENTS + stats.failed,
        "every call is a success or a counted failure"
    );
    // Per key, the deliveries that never failed ran in publish order.
    let mut by_key: HashMap<u64, Vec<u64>> = HashMap::new();
    for &(key, seq, attempt) in succeeded.iter() {
        if attempt == 1 {
            by_key.entry(key).or_default().push(seq);
        }
    }
    for (key, seqs) in &by_key {
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "key {key}: {seqs:?}");
    }
    // Opened once by the outage, then each failed probe opened it again; closed at the end.
    let opened = changes
        .iter()
        .filter(|c| c.to == BreakerState::Open)
        .count() as u64;
    assert_eq!(opened, 1 + probes);
    assert_eq!(
        (changes[0].from, changes[0].to, changes[0].cool_down),
        (
            BreakerState::Closed,
            BreakerState::Open,
            Some(Duration::from_millis(5))
        )
    );
    // Reported in the order they happened: each change starts where the one before ended.
    assert!(
        changes.windows(2).all(|w| w[0].to == w[1].from),
        "{changes:?}"
    );
    let last = changes.last().unwrap();
    assert_eq!(
        (last.from, last.to),
        (BreakerState::HalfOpen, BreakerState::Closed)
    );
    let metrics = bus.metrics();
    assert_eq!(metrics.handlers[0].breaker, Some(BreakerState::Closed));
    assert_eq!(metrics.handlers[0].breaker_opened, opened);
    assert!(
        metrics
            .to_prometheus()
            .contains("microbus_handler_breaker_state{")
    );
    drop(succeeded);
    assert!(bus.shutdown().unwrap().is_balanced());
}

#[test]
fn without_a_breaker_the_same_outage_dead_letters() {
    let (bus, gateway, _) = run(None);
    let stats = bus.stats();
    assert!(stats.dead_lettered > 0, "{stats:?}");
    assert_eq!(stats.succeeded + stats.dead_lettered, EVENTS);
    assert_eq!(
        gateway.succeeded.lock().unwrap().len() as u64,
        stats.succeeded
    );
    assert!(bus.shutdown().unwrap().is_balanced());
}

#[test]
fn an_open_breaker_shows_in_the_metrics_and_a_panicking_callback_is_counted() {
    let bus = Bus::builder()
        .workers(1)
        .retry(RetryPolicy::none())
        .build()
        .unwrap();
    let breaker =
        CircuitBreaker::new(2, Duration::from_secs(3600)).on_change(|_| panic!("callback"));
    bus.subscribe_with(
        SubscribeOptions::new().circuit_breaker(breaker),
        |_: &Keyed, _: &Context| -> HandlerResult { Err(HandlerError::msg("down")) },
    )
    .unwrap();
    for seq in 0..10 {
        bus.publish(Keyed { key: 0, seq }).unwrap();
    }
    let start = Instant::now();
    while bus.metrics().handlers[0].parked < 8 {
        assert!(start.elapsed() < WAIT, "the breaker never parked the rest");
        std::thread::yield_now();
    }
    let metrics = bus.metrics();
    assert_eq!(metrics.handlers[0].breaker, Some(BreakerState::Open));
    assert!(metrics.to_string().contains("open"));
    let health = bus.health();
    assert!(!health.is_ready());
    assert_eq!(
        (health.open_breakers.len(), health.open_breakers[0].parked),
        (1, 8)
    );
    assert!(
        health
            .to_string()
            .starts_with("not ready: breaker open for"),
        "{health}"
    );
    let stats = bus.stats();
    assert_eq!((stats.failed, stats.dead_lettered), (2, 2));
    while bus.stats().callback_panics.breaker == 0 {
        assert!(
            start.elapsed() < WAIT,
            "the callback's panic was never counted"
        );
        std::thread::yield_now();
    }
    // Shutdown does not wait out an hour's cool-down: the parked ones are dead letters now.
    let report = bus.shutdown().unwrap();
    assert!(report.is_balanced(), "{report}");
    assert_eq!(report.stats.dead_lettered, 10);
}

#[test]
fn bad_breaker_settings_are_refused() {
    let bus = Bus::builder().build().unwrap();
    for breaker in [
        CircuitBreaker::new(0, Duration::from_secs(1)),
        CircuitBreaker::new(1, Duration::ZERO),
        CircuitBreaker::new(1, Duration::from_secs(2)).max_cool_down(Duration::from_secs(1)),
    ] {
        let err = bus
            .subscribe_with(
                SubscribeOptions::new().circuit_breaker(breaker),
                |_: &Keyed, _: &Context| -> HandlerResult { Ok(()) },
            )
            .unwrap_err();
        assert!(
            matches!(
                err,
                SubscribeError::Invalid {
                    option: "circuit_breaker",
                    ..
                }
            ),
            "{err}"
        );
    }
}

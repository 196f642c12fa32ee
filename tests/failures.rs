//! Failing handlers: errors and panics fail one delivery, never the worker or the siblings.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use common::{Numbered, WAIT, count, quiet_worker_panics};
use std::time::Duration;

use microbus::{Bus, Context, HandlerError, HandlerResult, RetryPolicy};

#[test]
fn a_panic_on_every_tenth_event_fails_only_those_deliveries() {
    const EVENTS: u64 = 1_000;
    quiet_worker_panics();
    let bus = Bus::builder()
        .workers(2)
        .retry(RetryPolicy::none())
        .build()
        .unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    let sibling = Arc::new(AtomicU64::new(0));
    let panicky = {
        let handled = handled.clone();
        bus.subscribe(move |e: &Numbered, _: &Context| -> HandlerResult {
            if e.seq.is_multiple_of(10) {
                panic!("event {} is cursed", e.seq);
            }
            handled.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
        .unwrap()
    };
    let steady = {
        let sibling = sibling.clone();
        bus.subscribe(move |_: &Numbered, _: &Context| -> HandlerResult {
            sibling.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
        .unwrap()
    };
    for seq in 0..EVENTS {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    bus.flush(WAIT).unwrap();
    assert_eq!(count(&handled), EVENTS * 9 / 10);
    assert_eq!(count(&sibling), EVENTS);
    let stats = panicky.stats();
    assert_eq!((stats.failed, stats.panicked), (EVENTS / 10, EVENTS / 10));
    assert!(
        stats
            .last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("handler panicked: event ") && e.ends_with(" is cursed")),
        "{stats:?}"
    );
    assert_eq!(steady.stats().failed, 0);
    let report = bus.shutdown().unwrap();
    assert_eq!(report.stats.delivered, 2 * EVENTS);
    assert_eq!(report.stats.succeeded, 2 * EVENTS - EVENTS / 10);
    assert_eq!(report.stats.failed, EVENTS / 10);
    assert_eq!(report.stats.panicked, EVENTS / 10);
    assert_eq!(report.stats.dead_lettered, EVENTS / 10);
    assert_eq!(bus.dead_letters().len() as u64, EVENTS / 10);
    assert!(report.is_balanced());
}

#[derive(Debug)]
struct Declined(u64);

impl std::fmt::Display for Declined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "card declined for order {}", self.0)
    }
}

impl std::error::Error for Declined {}

#[test]
fn errors_are_counted_with_their_text_and_permanent_ones_are_not_retried() {
    let bus = Bus::builder()
        .workers(1)
        .retry(RetryPolicy::fixed(Duration::from_millis(1)).max_attempts(3))
        .build()
        .unwrap();
    let sub = bus
        .subscribe(|e: &Numbered, _: &Context| -> HandlerResult {
            match e.seq % 3 {
                0 => Ok(()),
                1 => Err(Declined(e.seq).into()),
                _ => Err(HandlerError::permanent(Declined(e.seq))),
            }
        })
        .unwrap();
    for seq in 0..9 {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    bus.flush(WAIT).unwrap();
    let stats = sub.stats();
    // Three retryable failures tried 3 times each, three permanent ones once each.
    assert_eq!((stats.failed, stats.panicked), (3 * 3 + 3, 0));
    assert!(
        stats
            .last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("card declined for order ")),
        "{stats:?}"
    );
    let bus_stats = bus.stats();
    assert_eq!((bus_stats.succeeded, bus_stats.failed), (3, 12));
    assert_eq!((bus_stats.retried, bus_stats.dead_lettered), (6, 6));
    assert_eq!(bus_stats.delivered, 9);
    assert!(bus_stats.is_balanced(), "{bus_stats:?}");
}

//! Conservation: every delivery is settled exactly once, and each term of
//! `delivered = succeeded + dead_lettered + discarded + cancelled + abandoned + left` is what the
//! handlers' own counts say it must be.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{Numbered, Tally, WAIT, count, quiet_worker_panics};
use microbus::{Bus, Context, HandlerError, HandlerResult, RetryPolicy};

const EVENTS: u64 = 100_000;

/// What the flaky handler does with event `seq` on attempt `attempt`.
fn fate(seq: u64, attempt: u32) -> HandlerResult {
    match seq % 1_000 {
        // 10%: transient, fails the first attempt only.
        0..100 if attempt == 1 => Err(HandlerError::msg("transient")),
        // 1%: permanent.
        100..110 => Err(HandlerError::permanent(HandlerError::msg("permanent"))),
        // 0.5%: panics on every attempt.
        110..115 => panic!("handler bug on {seq}"),
        _ => Ok(()),
    }
}

#[test]
fn mixed_failures_account_exactly() {
    quiet_worker_panics();
    let bus = Bus::builder()
        .workers(4)
        .retry(RetryPolicy::fixed(Duration::from_millis(1)).max_attempts(3))
        .build()
        .unwrap();
    let calls = Arc::new(Tally::new(EVENTS as usize));
    let steady = Arc::new(AtomicU64::new(0));
    {
        let calls = calls.clone();
        bus.subscribe(move |e: &Numbered, ctx: &Context| -> HandlerResult {
            calls.mark(e.seq as usize);
            fate(e.seq, ctx.attempt())
        })
        .unwrap();
        let steady = steady.clone();
        bus.subscribe(move |_: &Numbered, _: &Context| -> HandlerResult {
            steady.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
        .unwrap();
    }
    let publishers: Vec<_> = (0..2u64)
        .map(|half| {
            let bus = bus.clone();
            std::thread::spawn(move || {
                for seq in (half..EVENTS).step_by(2) {
                    bus.publish(Numbered { publisher: 0, seq }).unwrap();
                }
            })
        })
        .collect();
    for p in publishers {
        p.join().unwrap();
    }
    bus.flush(WAIT).unwrap();

    let per_thousand = |range: std::ops::Range<u64>| (EVENTS / 1_000) * (range.end - range.start);
    let (transient, permanent, panicking) = (
        per_thousand(0..100),
        per_thousand(100..110),
        per_thousand(110..115),
    );
    // Attempts per event: 2 for the transient ones, 3 for the panicking ones, 1 otherwise.
    for seq in 0..EVENTS as usize {
        let expected = match seq as u64 % 1_000 {
            0..100 => 2,
            110..115 => 3,
            _ => 1,
        };
        assert_eq!(calls.get(seq), expected, "event {seq}");
    }
    assert_eq!(count(&steady), EVENTS);

    let report = bus.shutdown().unwrap();
    let s = &report.stats;
    assert_eq!(s.delivered, 2 * EVENTS);
    assert_eq!(s.succeeded, 2 * EVENTS - permanent - panicking);
    assert_eq!(s.dead_lettered, permanent + panicking);
    assert_eq!(s.failed, transient + permanent + 3 * panicking);
    assert_eq!(s.panicked, 3 * panicking);
    assert_eq!(s.retried, transient + 2 * panicking);
    assert_eq!(
        (s.discarded, s.cancelled, s.abandoned, s.left, s.in_flight),
        (0, 0, 0, 0, 0)
    );
    assert!(report.is_balanced(), "{report}");
    assert_eq!(
        bus.dead_letters().len() as u64,
        permanent + panicking,
        "the ring holds every dead letter"
    );
}

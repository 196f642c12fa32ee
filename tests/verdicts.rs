//! Failures that say what to do: `HandlerError::retry_after`, `HandlerError::discard` (the
//! ledger's `dropped` term) and a subscription's `retry_if` classifier, on the worker and for
//! deferred deliveries, with exact outcome counts.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{Numbered, WAIT, count, quiet_worker_panics};
use microbus::{
    Bus, Context, DeadLetterReason, HandlerError, HandlerResult, Publish, RetryPolicy,
    SubscribeOptions, Verdict,
};

const EVENTS: u64 = 200;

/// A policy whose own delay no test could wait for.
fn an_hour() -> RetryPolicy {
    RetryPolicy::fixed(Duration::from_secs(3600)).max_attempts(3)
}

#[test]
fn retry_after_replaces_the_policys_delay_and_still_spends_attempts() {
    let bus = Bus::builder().workers(2).retry(an_hour()).build().unwrap();
    // Fails each event's first attempt, asking for 1 ms instead of the policy's hour.
    let attempts = Arc::new(AtomicU64::new(0));
    let seen = attempts.clone();
    bus.subscribe(move |_: &Numbered, ctx: &Context| -> HandlerResult {
        seen.fetch_add(1, Ordering::SeqCst);
        if ctx.attempt() == 1 {
            return Err(HandlerError::msg("busy").retry_after(Duration::from_millis(1)));
        }
        Ok(())
    })
    .unwrap();
    // Always asks for 1 ms: three attempts, then the ring, as the policy says.
    bus.subscribe_with(
        SubscribeOptions::new().named("always"),
        |_: &Numbered, _: &Context| -> HandlerResult {
            Err(HandlerError::msg("busy").retry_after(Duration::from_millis(1)))
        },
    )
    .unwrap();
    for seq in 0..EVENTS {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    // With the policy's delay this flush would time out.
    bus.flush(WAIT).unwrap();
    assert_eq!(count(&attempts), 2 * EVENTS);
    let stats = bus.stats();
    assert_eq!(stats.delivered, 2 * EVENTS);
    assert_eq!(stats.succeeded, EVENTS);
    assert_eq!(stats.failed, EVENTS + 3 * EVENTS);
    assert_eq!(stats.retried, EVENTS + 2 * EVENTS);
    assert_eq!(stats.dead_lettered, EVENTS);
    let letters = bus.dead_letters().list();
    assert!(
        letters
            .iter()
            .all(|l| l.reason() == DeadLetterReason::RetriesExhausted
                && l.handler() == "always"
                && l.attempts() == 3)
    );
    assert!(bus.shutdown().unwrap().is_balanced());
}

#[test]
fn a_discarded_failure_is_dropped_never_retried_or_dead_lettered() {
    for dead_letters in [true, false] {
        let mut builder = Bus::builder().workers(2).retry(an_hour());
        if !dead_letters {
            builder = builder.dead_letter_capacity(0);
        }
        let bus = builder.build().unwrap();
        let subscription = bus
            .subscribe(|n: &Numbered, _: &Context| -> HandlerResult {
                if n.seq.is_multiple_of(4) {
                    return Err(HandlerError::discard("stale"));
                }
                Ok(())
            })
            .unwrap();
        let tracker = bus
            .publish_with(
                Numbered {
                    publisher: 0,
                    seq: 0,
                },
                Publish::new().tracked(),
            )
            .unwrap();
        for seq in 1..EVENTS {
            bus.publish(Numbered { publisher: 0, seq }).unwrap();
        }
        bus.flush(WAIT).unwrap();
        let completion = tracker.wait(WAIT).unwrap();
        assert_eq!((completion.dropped, completion.succeeded), (1, 0));
        let stats = bus.stats();
        assert_eq!(stats.dropped, EVENTS / 4, "dead letters on: {dead_letters}");
        assert_eq!(stats.succeeded, EVENTS - EVENTS / 4);
        assert_eq!(stats.failed, EVENTS / 4);
        assert_eq!(
            (stats.retried, stats.dead_lettered, stats.discarded),
            (0, 0, 0)
        );
        assert!(stats.is_balanced(), "{stats:?}");
        assert_eq!(subscription.stats().last_error.as_deref(), Some("stale"));
        let metrics = bus.metrics();
        assert_eq!(metrics.handlers[0].dropped, EVENTS / 4);
        assert!(
            metrics
                .to_prometheus()
                .contains(&format!("microbus_bus_dropped_total {}", EVENTS / 4))
        );
        assert!(metrics.to_string().contains("dropped"), "{metrics}");
        let report = bus.shutdown().unwrap();
        assert!(report.is_balanced(), "{report}");
        assert_eq!(report.stats.dropped, EVENTS / 4);
    }
}

/// A user's own error type, which a classifier reaches through `downcast_ref`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gateway {
    Declined,
    Busy,
    Stale,
    Flaky,
}

impl std::fmt::Display for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "gateway: {self:?}")
    }
}

impl std::error::Error for Gateway {}

#[test]
fn a_classifier_decides_from_the_users_own_error_type() {
    let bus = Bus::builder().workers(2).retry(an_hour()).build().unwrap();
    let classified = Arc::new(AtomicU64::new(0));
    let calls = classified.clone();
    let options = SubscribeOptions::new().retry_if(move |err: &HandlerError| {
        calls.fetch_add(1, Ordering::SeqCst);
        match err.downcast_ref::<Gateway>() {
            Some(Gateway::Declined) => Verdict::Permanent,
            Some(Gateway::Busy) => Verdict::RetryAfter(Duration::from_millis(1)),
            Some(Gateway::Stale) => Verdict::Discard,
            _ => Verdict::Retry,
        }
    });
    // By `seq % 4`: declined, busy once, stale, and flaky with the handler's own word
    // (`retry_after`), which the classifier never sees.
    bus.subscribe_with(options, |n: &Numbered, ctx: &Context| -> HandlerResult {
        let error = match (n.seq % 4, ctx.attempt()) {
            (0, _) => Gateway::Declined,
            (1, 1) => Gateway::Busy,
            (2, _) => Gateway::Stale,
            (3, 1) => {
                return Err(
                    HandlerError::from(Gateway::Flaky).retry_after(Duration::from_millis(1))
                );
            }
            _ => return Ok(()),
        };
        Err(error.into())
    })
    .unwrap();
    for seq in 0..EVENTS {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    bus.flush(WAIT).unwrap();
    let quarter = EVENTS / 4;
    let stats = bus.stats();
    assert_eq!(stats.dead_lettered, quarter);
    assert_eq!(stats.dropped, quarter);
    assert_eq!(stats.succeeded, 2 * quarter);
    assert_eq!(stats.retried, 2 * quarter);
    assert_eq!(stats.failed, 4 * quarter);
    assert_eq!(count(&classified), 3 * quarter);
    let letters = bus.dead_letters().list();
    assert_eq!(letters.len() as u64, quarter);
    assert!(
        letters
            .iter()
            .all(|l| l.reason() == DeadLetterReason::Permanent
                && l.attempts() == 1
                && l.errors() == ["gateway: Declined"])
    );
    assert!(bus.shutdown().unwrap().is_balanced());
}

#[test]
fn a_classifier_that_panics_is_counted_and_the_policy_decides() {
    quiet_worker_panics();
    let bus = Bus::builder()
        .workers(1)
        .retry(RetryPolicy::fixed(Duration::from_millis(1)).max_attempts(2))
        .build()
        .unwrap();
    let options =
        SubscribeOptions::new().retry_if(|_: &HandlerError| -> Verdict { panic!("classifier") });
    bus.subscribe_with(options, |_: &Numbered, ctx: &Context| -> HandlerResult {
        if ctx.attempt() == 1 {
            return Err(HandlerError::msg("once"));
        }
        Ok(())
    })
    .unwrap();
    for seq in 0..EVENTS {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    bus.flush(WAIT).unwrap();
    let stats = bus.stats();
    assert_eq!(stats.callback_panics.classifier, EVENTS);
    assert_eq!(
        (stats.failed, stats.retried, stats.succeeded),
        (EVENTS, EVENTS, EVENTS)
    );
    assert!(bus.metrics().to_prometheus().contains(&format!(
        r#"microbus_callback_panics_total{{seam="classifier"}} {EVENTS}"#
    )));
    assert!(bus.shutdown().unwrap().is_balanced());
}

#[test]
fn a_deferred_delivery_completed_with_a_verdict_follows_it() {
    let bus = Bus::builder().workers(2).retry(an_hour()).build().unwrap();
    let attempts = Arc::new(AtomicU64::new(0));
    let seen = attempts.clone();
    let options = SubscribeOptions::new().retry_if(|err: &HandlerError| {
        match err.downcast_ref::<Gateway>() {
            Some(Gateway::Stale) => Verdict::Discard,
            _ => Verdict::Retry,
        }
    });
    bus.subscribe_with(
        options,
        move |n: &Numbered, ctx: &Context| -> HandlerResult {
            seen.fetch_add(1, Ordering::SeqCst);
            let deferred = ctx.defer();
            let (seq, attempt) = (n.seq, ctx.attempt());
            std::thread::spawn(move || match (seq % 3, attempt) {
                (0, _) => deferred.fail(HandlerError::discard("duplicate")),
                (1, 1) => deferred.fail(HandlerError::msg("busy").retry_after(Duration::ZERO)),
                (2, _) => deferred.fail(Gateway::Stale),
                _ => deferred.succeed(),
            });
            Ok(())
        },
    )
    .unwrap();
    let events = 150;
    for seq in 0..events {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    bus.flush(WAIT).unwrap();
    let third = events / 3;
    let stats = bus.stats();
    assert_eq!(stats.dropped, 2 * third);
    assert_eq!(stats.succeeded, third);
    assert_eq!((stats.retried, stats.dead_lettered), (third, 0));
    assert_eq!(count(&attempts), events + third);
    assert!(bus.shutdown().unwrap().is_balanced());
}

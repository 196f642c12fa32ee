//! Dead letters: deliveries that failed for good are kept, counted, exported, redriven and
//! purged; nothing leaves the ring without a trace.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Numbered, WAIT, count};
use microbus::{
    Bus, Context, DeadLetterFilter, DeadLetterReason, EventId, HandlerError, HandlerResult,
    Publish, RedriveError, RetryPolicy, SubscribeOptions,
};

fn fast(attempts: u32) -> RetryPolicy {
    RetryPolicy::fixed(Duration::from_millis(1)).max_attempts(attempts)
}

#[test]
fn an_exhausted_delivery_keeps_every_error_and_a_permanent_one_keeps_one() {
    let bus = Bus::builder()
        .service_name("Orders")
        .workers(1)
        .retry(fast(3))
        .build()
        .unwrap();
    let payments = bus.service("Payments").unwrap();
    payments
        .subscribe_with(
            SubscribeOptions::new().named("charge"),
            |e: &Numbered, ctx: &Context| -> HandlerResult {
                Err(HandlerError::msg(format_args!(
                    "attempt {} of {}",
                    ctx.attempt(),
                    e.seq
                )))
            },
        )
        .unwrap();
    payments
        .subscribe_with(
            SubscribeOptions::new().named("fraud-check"),
            |_: &Numbered, _: &Context| -> HandlerResult {
                Err(HandlerError::permanent(HandlerError::msg("blocked card")))
            },
        )
        .unwrap();
    let trace = EventId::new();
    bus.publish_with(
        Numbered {
            publisher: 1,
            seq: 7,
        },
        Publish::keyed(7u64).correlation(trace),
    )
    .unwrap();
    bus.flush(WAIT).unwrap();

    let dead = bus.dead_letters();
    assert_eq!(dead.len(), 2);
    let exhausted = &dead.filter(&DeadLetterFilter::new().handler("charge"))[0];
    assert_eq!(exhausted.reason(), DeadLetterReason::RetriesExhausted);
    assert_eq!(exhausted.attempts(), 3);
    assert_eq!(
        exhausted.errors(),
        ["attempt 1 of 7", "attempt 2 of 7", "attempt 3 of 7"]
    );
    assert_eq!(exhausted.service(), "Payments");
    assert_eq!(exhausted.event_name(), "Numbered");
    assert_eq!(exhausted.envelope().correlation_id(), trace);
    assert_eq!(exhausted.envelope().source(), "Orders");
    assert!(exhausted.first_failure() <= exhausted.last_failure());
    let payload: Numbered = serde_json::from_str(exhausted.payload_json()).unwrap();
    assert_eq!(
        payload,
        Numbered {
            publisher: 1,
            seq: 7
        }
    );

    let permanent = &dead.filter(&DeadLetterFilter::new().reason(DeadLetterReason::Permanent))[0];
    assert_eq!(permanent.handler(), "fraud-check");
    assert_eq!(
        (permanent.attempts(), permanent.errors()),
        (1, &["blocked card".to_owned()][..])
    );
    assert_eq!(permanent.envelope().id(), exhausted.envelope().id());

    let stats = bus.stats();
    assert_eq!(
        (stats.delivered, stats.dead_lettered, stats.failed),
        (2, 2, 4)
    );
    assert!(stats.is_balanced());
}

#[test]
fn a_full_ring_evicts_the_oldest_to_the_sink() {
    let sunk = Arc::new(Mutex::new(Vec::new()));
    let alerted = Arc::new(AtomicU64::new(0));
    let bus = {
        let (sunk, alerted) = (sunk.clone(), alerted.clone());
        Bus::builder()
            .workers(1)
            .retry(RetryPolicy::none())
            .dead_letter_capacity(8)
            .dead_letter_sink(move |l| sunk.lock().unwrap().push(l.id()))
            .on_dead_letter(move |_| {
                alerted.fetch_add(1, Ordering::SeqCst);
            })
            .build()
            .unwrap()
    };
    bus.subscribe(|_: &Numbered, _: &Context| -> HandlerResult { Err(HandlerError::msg("no")) })
        .unwrap();
    for seq in 0..20 {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    bus.flush(WAIT).unwrap();
    let dead = bus.dead_letters();
    let kept: Vec<u64> = dead
        .list()
        .iter()
        .map(|l| {
            serde_json::from_str::<Numbered>(l.payload_json())
                .unwrap()
                .seq
        })
        .collect();
    assert_eq!(kept, (12..20).collect::<Vec<_>>());
    assert_eq!(dead.len(), 8);
    assert_eq!(dead.capacity(), 8);
    assert_eq!(dead.evicted(), 12);
    assert_eq!(*sunk.lock().unwrap(), (1..=12).collect::<Vec<_>>());
    assert_eq!(count(&alerted), 20);
    let stats = bus.stats();
    assert_eq!((stats.dead_lettered, stats.evicted), (20, 12));
    assert!(stats.is_balanced());
}

#[test]
fn a_redriven_dead_letter_reaches_the_fixed_handler_once_with_its_envelope() {
    let bus = Bus::builder()
        .workers(2)
        .retry(RetryPolicy::none())
        .build()
        .unwrap();
    let fixed = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    {
        let (fixed, seen) = (fixed.clone(), seen.clone());
        bus.subscribe(move |e: &Numbered, ctx: &Context| -> HandlerResult {
            if !fixed.load(Ordering::SeqCst) {
                return Err(HandlerError::msg("broken"));
            }
            seen.lock()
                .unwrap()
                .push((e.seq, ctx.event_id(), ctx.correlation_id(), ctx.attempt()));
            Ok(())
        })
        .unwrap();
    }
    bus.publish(Numbered {
        publisher: 0,
        seq: 1,
    })
    .unwrap();
    bus.publish(Numbered {
        publisher: 0,
        seq: 2,
    })
    .unwrap();
    bus.flush(WAIT).unwrap();
    let dead = bus.dead_letters();
    let letters = dead.list();
    assert_eq!(letters.len(), 2);
    fixed.store(true, Ordering::SeqCst);

    let first = &letters[0];
    dead.redrive(first.id()).unwrap();
    bus.flush(WAIT).unwrap();
    assert_eq!(dead.len(), 1);
    let first_seq = serde_json::from_str::<Numbered>(first.payload_json())
        .unwrap()
        .seq;
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(
            first_seq,
            first.envelope().id(),
            first.envelope().correlation_id(),
            1
        )]
    );
    assert_eq!(
        dead.redrive(first.id()),
        Err(RedriveError::NotFound(first.id()))
    );

    assert_eq!(dead.redrive_all(), Ok(1));
    bus.flush(WAIT).unwrap();
    assert!(dead.is_empty());
    assert_eq!(seen.lock().unwrap().len(), 2);
    let stats = bus.stats();
    // Two deliveries dead-lettered, then two more (the redrives) succeeded.
    assert_eq!(
        (stats.delivered, stats.dead_lettered, stats.succeeded),
        (4, 2, 2)
    );
    assert!(stats.is_balanced());
}

#[test]
fn export_is_one_json_object_per_line() {
    let bus = Bus::builder()
        .workers(1)
        .retry(RetryPolicy::none())
        .build()
        .unwrap();
    bus.subscribe(|_: &Numbered, _: &Context| -> HandlerResult { Err(HandlerError::msg("x")) })
        .unwrap();
    for seq in 0..3 {
        bus.publish_with(
            Numbered { publisher: 0, seq },
            Publish::new().header("tenant", "acme"),
        )
        .unwrap();
    }
    bus.flush(WAIT).unwrap();
    let export = bus.dead_letters().export_json();
    let lines: Vec<serde_json::Value> = export
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for (seq, line) in lines.iter().enumerate() {
        assert_eq!(line["event"], "Numbered");
        assert_eq!(line["version"], 1);
        assert_eq!(line["payload"]["seq"], seq);
        assert_eq!(line["errors"][0], "x");
        assert_eq!(line["reason"], "retries_exhausted");
        assert_eq!(line["envelope"]["source"], "app");
        let id: EventId = line["envelope"]["id"].as_str().unwrap().parse().unwrap();
        assert_eq!(line["envelope"]["correlation_id"], id.to_string());
    }
}

#[test]
fn filters_choose_what_to_redrive_and_purge_and_gone_subscriptions_stay() {
    let bus = Bus::builder()
        .workers(1)
        .retry(RetryPolicy::none())
        .build()
        .unwrap();
    let a = bus.service("A").unwrap();
    let b = bus.service("B").unwrap();
    let kept = bus
        .subscribe_with(
            SubscribeOptions::new().named("kept"),
            |_: &Numbered, _: &Context| -> HandlerResult { Err(HandlerError::msg("no")) },
        )
        .unwrap();
    let gone = bus
        .subscribe_with(
            SubscribeOptions::new().named("gone"),
            |_: &Numbered, _: &Context| -> HandlerResult { Err(HandlerError::msg("no")) },
        )
        .unwrap();
    a.publish(Numbered {
        publisher: 0,
        seq: 0,
    })
    .unwrap();
    b.publish(Numbered {
        publisher: 0,
        seq: 1,
    })
    .unwrap();
    bus.flush(WAIT).unwrap();
    let dead = bus.dead_letters();
    assert_eq!(dead.len(), 4);
    assert_eq!(dead.filter(&DeadLetterFilter::new().source("A")).len(), 2);
    assert_eq!(
        dead.filter(&DeadLetterFilter::new().event("Other")).len(),
        0
    );

    gone.unsubscribe();
    let gone_letter = dead.filter(&DeadLetterFilter::new().handler("gone"))[0].id();
    assert_eq!(
        dead.redrive(gone_letter),
        Err(RedriveError::SubscriptionGone(gone_letter))
    );
    assert_eq!(dead.len(), 4, "a failed redrive keeps the dead letter");
    // With both subscriptions ended nothing goes back, and every dead letter stays.
    kept.unsubscribe();
    assert_eq!(dead.redrive_all(), Ok(0));
    assert_eq!(dead.purge_where(&DeadLetterFilter::new().source("B")), 2);
    assert_eq!(dead.purge(), 2);
    assert!(dead.is_empty());
}

#[test]
fn with_dead_letters_off_failures_are_discarded() {
    let bus = Bus::builder()
        .workers(1)
        .retry(fast(2))
        .dead_letter_capacity(0)
        .build()
        .unwrap();
    bus.subscribe(|_: &Numbered, _: &Context| -> HandlerResult { Err(HandlerError::msg("no")) })
        .unwrap();
    bus.publish(Numbered {
        publisher: 0,
        seq: 0,
    })
    .unwrap();
    bus.flush(WAIT).unwrap();
    assert!(bus.dead_letters().is_empty());
    let stats = bus.stats();
    assert_eq!(
        (stats.discarded, stats.dead_lettered, stats.failed),
        (1, 0, 2)
    );
    assert!(stats.is_balanced());
}

#[test]
fn shutdown_dead_letters_retries_not_yet_due() {
    let bus = Bus::builder()
        .workers(1)
        .retry(RetryPolicy::fixed(Duration::from_secs(300)).max_attempts(2))
        .build()
        .unwrap();
    bus.subscribe(|_: &Numbered, _: &Context| -> HandlerResult { Err(HandlerError::msg("later")) })
        .unwrap();
    bus.publish(Numbered {
        publisher: 0,
        seq: 0,
    })
    .unwrap();
    while bus.stats().retried == 0 {
        std::thread::yield_now();
    }
    let report = bus.shutdown().unwrap();
    assert_eq!(report.stats.dead_lettered, 1);
    assert!(report.is_balanced(), "{report}");
    let letters = bus.dead_letters().list();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason(), DeadLetterReason::Shutdown);
    assert_eq!(letters[0].errors(), ["later"]);
    assert_eq!(
        bus.dead_letters().redrive(letters[0].id()),
        Err(RedriveError::Shutdown(letters[0].id()))
    );
}

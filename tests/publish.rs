//! Publishing: every event reaches every subscription once, keyed order, backpressure, and
//! events handed back whenever they are not accepted.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Held, Keyed, Numbered, Tally, WAIT, count, hold_the_only_worker};
use microbus::{
    Bus, Context, HandlerResult, Publish, PublishTimeoutError, TryPublishError, WaitStrategy,
};

#[test]
fn two_publishers_two_subscriptions_each_event_exactly_once() {
    const PER_PUBLISHER: u64 = 100_000;
    let bus = Bus::builder().workers(4).build().unwrap();
    let tallies: Vec<Arc<Tally>> = (0..2)
        .map(|_| Arc::new(Tally::new(2 * PER_PUBLISHER as usize)))
        .collect();
    for tally in &tallies {
        let tally = tally.clone();
        bus.subscribe(move |e: &Numbered, _: &Context| -> HandlerResult {
            tally.mark((u64::from(e.publisher) * PER_PUBLISHER + e.seq) as usize);
            Ok(())
        })
        .unwrap();
    }
    let publishers: Vec<_> = (0..2u32)
        .map(|publisher| {
            let bus = bus.clone();
            std::thread::spawn(move || {
                for seq in 0..PER_PUBLISHER {
                    bus.publish(Numbered { publisher, seq }).unwrap();
                }
            })
        })
        .collect();
    for p in publishers {
        p.join().unwrap();
    }
    bus.flush(WAIT).unwrap();
    for tally in &tallies {
        assert_eq!(tally.not_once(), vec![]);
    }
    let stats = bus.stats();
    assert_eq!(stats.delivered, 4 * PER_PUBLISHER);
    assert_eq!(stats.succeeded, 4 * PER_PUBLISHER);
    assert_eq!(stats.in_flight, 0);
    assert!(stats.is_balanced(), "{stats:?}");
}

#[test]
fn events_with_one_key_arrive_in_publish_order() {
    const KEYS: u64 = 64;
    const EVENTS: u64 = 50_000;
    let bus = Bus::builder().workers(4).build().unwrap();
    let next: Arc<Vec<AtomicU64>> = Arc::new((0..KEYS).map(|_| AtomicU64::new(0)).collect());
    let out_of_order = Arc::new(AtomicU64::new(0));
    let handled = Arc::new(AtomicU64::new(0));
    {
        let (next, out_of_order, handled) = (next.clone(), out_of_order.clone(), handled.clone());
        bus.subscribe(move |e: &Keyed, ctx: &Context| -> HandlerResult {
            assert_eq!(ctx.envelope().key().map(|k| k.get()), Some(e.key));
            // Each key lives on one shard, so one worker at a time touches its slot.
            let expected = next[e.key as usize].load(Ordering::Relaxed);
            if e.seq != expected {
                out_of_order.fetch_add(1, Ordering::Relaxed);
            }
            next[e.key as usize].store(e.seq + 1, Ordering::Relaxed);
            handled.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
        .unwrap();
    }
    for i in 0..EVENTS {
        let key = i % KEYS;
        bus.publish_with(Keyed { key, seq: i / KEYS }, Publish::keyed(key))
            .unwrap();
    }
    bus.flush(WAIT).unwrap();
    assert_eq!(count(&handled), EVENTS);
    assert_eq!(count(&out_of_order), 0);
    for key in 0..KEYS {
        let expected = EVENTS / KEYS + u64::from(key < EVENTS % KEYS);
        assert_eq!(
            next[key as usize].load(Ordering::Relaxed),
            expected,
            "key {key}"
        );
    }
}

/// Holds the only worker inside the handler of event 0.
fn held(capacity: usize) -> Held {
    let held = hold_the_only_worker(capacity);
    held.bus
        .publish(Numbered {
            publisher: 0,
            seq: 0,
        })
        .unwrap();
    held.entered.recv().unwrap();
    held
}

#[test]
fn try_publish_on_a_full_shard_returns_the_very_event() {
    let held = held(4);
    for seq in 1..=4 {
        held.bus
            .try_publish(Numbered { publisher: 0, seq })
            .unwrap();
    }
    match held.bus.try_publish(Numbered {
        publisher: 7,
        seq: 5,
    }) {
        Err(TryPublishError::Full(e)) => assert_eq!(
            e,
            Numbered {
                publisher: 7,
                seq: 5
            }
        ),
        other => panic!("expected Full, got {other:?}"),
    }
    match held.bus.publish_timeout(
        Numbered {
            publisher: 8,
            seq: 6,
        },
        Duration::from_millis(20),
    ) {
        Err(PublishTimeoutError::Timeout(e)) => assert_eq!(
            e,
            Numbered {
                publisher: 8,
                seq: 6
            }
        ),
        other => panic!("expected Timeout, got {other:?}"),
    }
    held.release.send(()).unwrap();
    held.bus.flush(WAIT).unwrap();
    assert_eq!(held.handled(), vec![0, 1, 2, 3, 4]);
    let report = held.bus.shutdown().unwrap();
    assert_eq!(report.stats.delivered, 5);
    assert_eq!(report.stats.succeeded, 5);
    assert!(report.is_balanced());
}

#[test]
fn a_blocked_publish_goes_through_when_room_appears() {
    let held = held(1);
    held.bus
        .publish(Numbered {
            publisher: 0,
            seq: 1,
        })
        .unwrap();
    let bus = held.bus.clone();
    let publisher = std::thread::spawn(move || {
        bus.publish(Numbered {
            publisher: 0,
            seq: 2,
        })
    });
    held.release.send(()).unwrap();
    publisher.join().unwrap().unwrap();
    held.bus.flush(WAIT).unwrap();
    assert_eq!(held.handled(), vec![0, 1, 2]);
}

#[test]
fn events_without_subscribers_are_counted() {
    let bus = Bus::builder().workers(1).build().unwrap();
    for seq in 0..3 {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    bus.flush(WAIT).unwrap();
    let stats = bus.stats();
    assert_eq!(stats.unmatched, 3);
    assert_eq!(stats.delivered, 0);
}

#[test]
fn publishing_after_shutdown_returns_the_event() {
    let bus = Bus::builder().workers(1).build().unwrap();
    bus.subscribe(|_: &Numbered, _: &Context| -> HandlerResult { Ok(()) })
        .unwrap();
    bus.shutdown().unwrap();
    let event = Numbered {
        publisher: 3,
        seq: 9,
    };
    assert_eq!(bus.publish(event.clone()).unwrap_err().into_event(), event);
    assert!(bus.try_publish(event.clone()).unwrap_err().is_shutdown());
    let err = bus
        .publish_timeout(event.clone(), Duration::from_millis(1))
        .unwrap_err();
    assert!(err.is_shutdown());
    assert_eq!(err.into_event(), event);
    // Unsubscribed types too: after shutdown nothing is counted as published.
    let other = common::FollowUp {
        parent: 1,
        index: 0,
    };
    assert_eq!(bus.publish(other.clone()).unwrap_err().into_event(), other);
    assert_eq!(bus.stats().refused, 4);
    assert_eq!(bus.stats().unmatched, 0);
}

#[test]
fn envelope_carries_options_and_source() {
    let bus = Bus::builder()
        .service_name("Orders")
        .workers(2)
        .build()
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    {
        let seen = seen.clone();
        bus.subscribe(move |_: &Numbered, ctx: &Context| -> HandlerResult {
            let env = ctx.envelope();
            seen.lock().unwrap().push((
                env.id(),
                env.correlation_id(),
                env.causation_id(),
                env.source(),
                env.key().map(|k| k.get()),
                env.headers().get("tenant").map(str::to_owned),
            ));
            Ok(())
        })
        .unwrap();
    }
    let trace = microbus::EventId::new();
    bus.publish(Numbered {
        publisher: 0,
        seq: 0,
    })
    .unwrap();
    bus.publish_with(
        Numbered {
            publisher: 0,
            seq: 1,
        },
        Publish::keyed(77u64)
            .correlation(trace)
            .header("tenant", "acme"),
    )
    .unwrap();
    bus.flush(WAIT).unwrap();
    let mut seen = seen.lock().unwrap().clone();
    seen.sort_by_key(|s| s.0);
    assert_eq!(seen.len(), 2);
    let (id, correlation, causation, source, key, tenant) = seen[0].clone();
    assert_eq!(correlation, id, "a root event is its own correlation");
    assert_eq!(
        (causation, source, key, tenant),
        (None, "Orders", None, None)
    );
    let (_, correlation, _, _, key, tenant) = seen[1].clone();
    assert_eq!(correlation, trace);
    assert_eq!(key, Some(77));
    assert_eq!(tenant.as_deref(), Some("acme"));
}

#[test]
fn public_handles_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Bus>();
    check::<microbus::Subscription>();
    check::<microbus::Envelope>();
    check::<microbus::EventId>();
    check::<microbus::ShutdownReport>();
    check::<microbus::BusStats>();
    check::<microbus::PublishError<Numbered>>();
    check::<microbus::TryPublishError<Numbered>>();
    check::<microbus::FlushError>();
    check::<microbus::Context<'static>>();
    check::<microbus::DeadLetters>();
    check::<microbus::DeadLetter>();
    check::<microbus::Trace>();
    check::<microbus::RetryPolicy>();
    check::<microbus::BusBuilder>();
}

#[test]
fn spinning_workers_deliver_everything_and_still_park() {
    let bus = Bus::builder()
        .workers(2)
        .wait_strategy(WaitStrategy::spin_then_park(Duration::from_micros(200)))
        .build()
        .unwrap();
    let tally = Arc::new(Tally::new(20_000));
    {
        let tally = tally.clone();
        bus.subscribe(move |e: &Numbered, _: &Context| -> HandlerResult {
            tally.mark(e.seq as usize);
            Ok(())
        })
        .unwrap();
    }
    for seq in 0..10_000 {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    // Idle longer than the spin: the workers park, and a publish wakes them.
    std::thread::sleep(Duration::from_millis(20));
    for seq in 10_000..20_000 {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    bus.flush(WAIT).unwrap();
    assert_eq!(tally.not_once(), vec![]);
    assert!(bus.shutdown().unwrap().is_balanced());
}

#[test]
fn an_envelope_made_elsewhere_is_kept_whole() {
    use microbus::{Envelope, EventId, Headers};
    let bus = Bus::builder()
        .service_name("shipping")
        .workers(2)
        .build()
        .unwrap();
    let seen: Arc<Mutex<Vec<Envelope>>> = Arc::default();
    {
        let seen = seen.clone();
        bus.subscribe(move |_: &Keyed, ctx: &Context| -> HandlerResult {
            seen.lock().unwrap().push(ctx.envelope().clone());
            Ok(())
        })
        .unwrap();
    }
    // An envelope as another process would send it: JSON with every field set.
    let correlation = EventId::new();
    let causation = EventId::new();
    let id = EventId::new();
    let json = format!(
        r#"{{"id":"{id}","correlation_id":"{correlation}","causation_id":"{causation}","source":"payments","published_at_unix_nanos":0,"key":42,"headers":{{"tenant":"acme","trace":"t-1"}}}}"#
    );
    let envelope: Envelope = serde_json::from_str(&json).unwrap();
    assert_eq!(
        serde_json::from_str::<Envelope>(&serde_json::to_string(&envelope).unwrap()).unwrap(),
        envelope
    );
    bus.publish_envelope(Keyed { key: 42, seq: 1 }, envelope.clone())
        .unwrap();
    bus.flush(WAIT).unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen, std::slice::from_ref(&envelope));
    let got = &seen[0];
    assert_eq!(
        (got.id(), got.correlation_id(), got.causation_id()),
        (id, correlation, Some(causation))
    );
    assert_eq!(got.source(), "payments");
    assert_eq!(got.key().map(|k| k.get()), Some(42));
    let mut headers = Headers::default();
    headers.insert("tenant", "acme");
    headers.insert("trace", "t-1");
    assert_eq!(got.headers(), &headers);
    // Counted as published by the service the envelope names.
    let m = bus.metrics();
    assert_eq!(m.event("Keyed", "payments").unwrap().published, 1);
    assert!(m.event("Keyed", "shipping").is_none());
    bus.shutdown().unwrap();
    let back = bus
        .publish_envelope(Keyed { key: 1, seq: 2 }, envelope)
        .unwrap_err();
    assert_eq!(back.into_event(), Keyed { key: 1, seq: 2 });
}

#[test]
fn an_envelope_with_a_bad_source_does_not_decode() {
    let json = r#"{"id":"0196a0b2-7c3d-7e4f-8a9b-0c1d2e3f4a5b","correlation_id":"0196a0b2-7c3d-7e4f-8a9b-0c1d2e3f4a5b","causation_id":null,"source":" padded","key":null}"#;
    let error = serde_json::from_str::<microbus::Envelope>(json).unwrap_err();
    assert!(error.to_string().contains("source"), "{error}");
}

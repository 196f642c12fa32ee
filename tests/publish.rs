//! Publishing: every event reaches every subscription once, keyed order, backpressure, and
//! events handed back whenever they are not accepted.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{FollowUp, Held, Keyed, Numbered, Tally, WAIT, count, hold_the_only_worker};
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
    bus.publish_with(
        Keyed { key: 42, seq: 1 },
        Publish::envelope(envelope.clone()),
    )
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
        .publish_with(Keyed { key: 1, seq: 2 }, Publish::envelope(envelope))
        .unwrap_err();
    assert_eq!(back.into_event(), Keyed { key: 1, seq: 2 });
}

#[test]
fn an_envelope_with_a_bad_source_does_not_decode() {
    let json = r#"{"id":"0196a0b2-7c3d-7e4f-8a9b-0c1d2e3f4a5b","correlation_id":"0196a0b2-7c3d-7e4f-8a9b-0c1d2e3f4a5b","causation_id":null,"source":" padded","key":null}"#;
    let error = serde_json::from_str::<microbus::Envelope>(json).unwrap_err();
    assert!(error.to_string().contains("source"), "{error}");
}

#[test]
fn a_publish_returns_the_id_its_handlers_see_and_so_does_a_handlers_publish() {
    let bus = Bus::builder().workers(2).build().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (staged, children) = (seen.clone(), seen.clone());
    bus.subscribe(move |e: &Numbered, ctx: &Context| -> HandlerResult {
        let child = ctx.publish(FollowUp {
            parent: e.seq,
            index: 0,
        });
        staged
            .lock()
            .unwrap()
            .push(("staged", e.seq, child.unwrap(), ctx.envelope().id()));
        Ok(())
    })
    .unwrap();
    bus.subscribe(move |e: &FollowUp, ctx: &Context| -> HandlerResult {
        let envelope = ctx.envelope();
        children.lock().unwrap().push((
            "child",
            e.parent,
            envelope.id(),
            envelope.causation_id().unwrap(),
        ));
        Ok(())
    })
    .unwrap();
    let mut published = Vec::new();
    for seq in 0..50 {
        let id = bus.publish(Numbered { publisher: 0, seq }).unwrap();
        published.push(id);
    }
    let tracked = bus
        .try_publish_with(
            Numbered {
                publisher: 0,
                seq: 50,
            },
            Publish::new().tracked(),
        )
        .unwrap();
    published.push(tracked.event_id());
    bus.flush(WAIT).unwrap();
    assert_eq!(tracked.completion().unwrap().succeeded, 1);
    let seen = seen.lock().unwrap();
    // Each parent's handler saw the id its publish returned, and each child arrived with the
    // id the handler's publish returned, naming its parent as the cause.
    let mut parents = 0;
    for (what, seq, id, other) in seen.iter() {
        match *what {
            "staged" => {
                parents += 1;
                assert_eq!(*other, published[*seq as usize]);
                let child = seen
                    .iter()
                    .find(|(w, s, _, _)| *w == "child" && s == seq)
                    .expect("the child arrived");
                assert_eq!((child.2, child.3), (*id, *other));
            }
            _ => assert_eq!(*other, published[*seq as usize]),
        }
    }
    assert_eq!((parents, seen.len()), (51, 102));
}

#[test]
fn a_batch_sends_its_delayed_events_through_the_timer_and_the_rest_at_once() {
    let bus = Bus::builder().workers(2).build().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    bus.subscribe(move |e: &Keyed, _: &Context| -> HandlerResult {
        log.lock().unwrap().push(e.seq);
        Ok(())
    })
    .unwrap();
    let later = Duration::from_millis(300);
    let items = (0..200u64).map(|seq| {
        let options = Publish::keyed(seq % 4);
        let options = if seq % 50 == 0 {
            options.delay(later)
        } else {
            options
        };
        (Keyed { key: seq % 4, seq }, options)
    });
    bus.publish_batch_with(items).unwrap();
    // The undelayed 196 arrive; the four delayed ones wait on the timer.
    let deadline = std::time::Instant::now() + WAIT;
    while seen.lock().unwrap().len() < 196 {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    }
    bus.flush(WAIT).unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 200);
    let tail: Vec<u64> = seen[196..].to_vec();
    let mut sorted = tail.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, vec![0, 50, 100, 150], "{tail:?}");
    let mut all = seen.clone();
    all.sort_unstable();
    assert_eq!(all, (0..200).collect::<Vec<_>>());
    assert_eq!(bus.stats().succeeded, 200);
}

#[test]
fn a_handler_publishes_with_a_delay_a_key_and_the_inherited_correlation() {
    let bus = Bus::builder().workers(2).build().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    bus.subscribe(move |e: &Numbered, ctx: &Context| -> HandlerResult {
        let follow_up = FollowUp {
            parent: e.seq,
            index: 1,
        };
        ctx.publish_with(
            follow_up,
            Publish::keyed(e.seq).delay(Duration::from_millis(20)),
        )
        .unwrap();
        ctx.publish_batch_with([(
            FollowUp {
                parent: e.seq,
                index: 2,
            },
            Publish::keyed(e.seq).delay(Duration::from_millis(10)),
        )])
        .unwrap();
        Ok(())
    })
    .unwrap();
    bus.subscribe(move |e: &FollowUp, ctx: &Context| -> HandlerResult {
        let envelope = ctx.envelope();
        log.lock().unwrap().push((
            e.parent,
            e.index,
            envelope.key().map(|k| k.get()),
            envelope.correlation_id(),
        ));
        Ok(())
    })
    .unwrap();
    let root = bus
        .publish(Numbered {
            publisher: 0,
            seq: 7,
        })
        .unwrap();
    bus.flush(WAIT).unwrap();
    let mut seen = seen.lock().unwrap().clone();
    seen.sort_unstable_by_key(|s| s.1);
    assert_eq!(seen, vec![(7, 1, Some(7), root), (7, 2, Some(7), root)]);
}

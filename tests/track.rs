//! Tracked publishes: a tracker completes once every delivery of its event has settled, with
//! what became of each — success, dead letter, discard, cancellation, left or abandoned at the
//! deadline — exactly once, whichever thread settles last.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Held, Keyed, Numbered, WAIT, hold_the_only_worker, quiet_worker_panics};
use microbus::{
    Bus, Completion, Context, HandlerError, HandlerResult, Publish, RetryPolicy, Tracker,
};

/// Publishes event `seq` of publisher 0, tracked.
fn tracked(bus: &Bus, seq: u64) -> Tracker {
    bus.publish_with(Numbered { publisher: 0, seq }, Publish::new().tracked())
        .unwrap()
}

#[test]
fn a_tracker_completes_with_every_outcome_counted() {
    quiet_worker_panics();
    let bus = Bus::builder()
        .workers(2)
        .retry(RetryPolicy::fixed(Duration::from_millis(1)).max_attempts(2))
        .build()
        .unwrap();
    bus.subscribe(|_: &Numbered, _: &Context| -> HandlerResult { Ok(()) })
        .unwrap();
    bus.subscribe(|_: &Numbered, ctx: &Context| -> HandlerResult {
        // Fails once, then succeeds.
        if ctx.attempt() == 1 {
            return Err(HandlerError::msg("once"));
        }
        Ok(())
    })
    .unwrap();
    bus.subscribe(|_: &Numbered, _: &Context| -> HandlerResult { panic!("always") })
        .unwrap();
    bus.subscribe(|_: &Numbered, _: &Context| -> HandlerResult {
        Err(HandlerError::permanent(HandlerError::msg("never")))
    })
    .unwrap();
    let tracker = tracked(&bus, 1);
    let done = tracker.wait(WAIT).expect("every delivery settles");
    let expected = {
        let mut c = Completion::default();
        c.deliveries = 4;
        c.succeeded = 2;
        c.dead_lettered = 2;
        c
    };
    assert_eq!(done, expected);
    assert!(!done.all_succeeded());
    assert_eq!(tracker.completion(), Some(done));
    // A callback registered after the fact runs at once, with the same outcome.
    let (tx, rx) = crossbeam_channel::bounded(1);
    tracker.on_complete(move |c| tx.send(c).unwrap());
    assert_eq!(rx.recv_timeout(WAIT).unwrap(), done);
    // Redriving the dead letters later is outside the tracker.
    bus.dead_letters().redrive_all().unwrap();
    bus.flush(WAIT).unwrap();
    assert_eq!(tracker.completion(), Some(done));
    assert!(bus.shutdown().unwrap().is_balanced());
}

#[test]
fn discards_cancellations_and_events_nobody_hears_complete_too() {
    let bus = Bus::builder()
        .workers(1)
        .dead_letter_capacity(0)
        .retry(RetryPolicy::none())
        .build()
        .unwrap();
    let nobody = bus
        .publish_with(Keyed { key: 1, seq: 1 }, Publish::new().tracked())
        .unwrap();
    let done = nobody.completion().expect("nothing to wait for");
    assert_eq!(done.deliveries, 0);
    assert!(done.all_succeeded());

    bus.subscribe(|_: &Numbered, _: &Context| -> HandlerResult {
        Err(HandlerError::msg("dropped: dead letters are off"))
    })
    .unwrap();
    let discarded = tracked(&bus, 1);
    assert_eq!(discarded.wait(WAIT).unwrap().discarded, 1);
    bus.shutdown().unwrap();

    let Held {
        bus,
        release,
        entered,
        ..
    } = hold_the_only_worker(16);
    let cancelled_sub = bus
        .subscribe(|_: &Numbered, _: &Context| -> HandlerResult { Ok(()) })
        .unwrap();
    bus.publish(Numbered {
        publisher: 0,
        seq: 0,
    })
    .unwrap();
    entered.recv().unwrap();
    let tracker = tracked(&bus, 1);
    // `unsubscribe` waits for the running call, so it goes on another thread; the handler is
    // released once the subscription reads as ended.
    let unsubscriber = std::thread::spawn(move || cancelled_sub.unsubscribe());
    while bus.metrics().handlers.iter().all(|h| h.active) {
        std::thread::yield_now();
    }
    release.send(()).unwrap();
    unsubscriber.join().unwrap();
    let done = tracker.wait(WAIT).unwrap();
    assert_eq!((done.deliveries, done.succeeded, done.cancelled), (2, 1, 1));
    bus.shutdown().unwrap();
}

#[test]
fn the_deadline_completes_trackers_as_left_and_abandoned() {
    let Held {
        bus,
        release,
        entered,
        ..
    } = hold_the_only_worker(16);
    let held = tracked(&bus, 0);
    entered.recv().unwrap();
    let queued = tracked(&bus, 1);
    let report = bus.shutdown_timeout(Duration::from_millis(50)).unwrap();
    assert_eq!((report.stats.abandoned, report.stats.left), (1, 1));
    assert_eq!(queued.wait(WAIT).unwrap().left, 1);
    // The abandoned delivery counts once its handler returns.
    assert_eq!(held.completion(), None);
    release.send(()).unwrap();
    assert_eq!(held.wait(WAIT).unwrap().abandoned, 1);
}

#[test]
fn trackers_from_many_threads_complete_exactly_once() {
    quiet_worker_panics();
    const PER_THREAD: u64 = 2_000;
    let bus = Bus::builder()
        .workers(2)
        .channel_capacity(16)
        .retry(RetryPolicy::fixed(Duration::from_millis(1)).max_attempts(2))
        .build()
        .unwrap();
    for sub in 0..2u64 {
        bus.subscribe(move |e: &Numbered, ctx: &Context| -> HandlerResult {
            match (e.seq + sub) % 7 {
                0 if ctx.attempt() == 1 => Err(HandlerError::msg("once")),
                3 => Err(HandlerError::permanent(HandlerError::msg("never"))),
                _ => Ok(()),
            }
        })
        .unwrap();
    }
    let callbacks = Arc::new(AtomicU64::new(0));
    let trackers: Vec<Tracker> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2u32)
            .map(|publisher| {
                let (bus, callbacks) = (&bus, callbacks.clone());
                s.spawn(move || {
                    (0..PER_THREAD)
                        .map(|seq| {
                            let t = bus
                                .publish_with(Numbered { publisher, seq }, Publish::new().tracked())
                                .unwrap();
                            let callbacks = callbacks.clone();
                            t.on_complete(move |_| {
                                callbacks.fetch_add(1, Ordering::SeqCst);
                            });
                            t
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let mut total = Completion::default();
    for t in &trackers {
        let c = t.wait(WAIT).expect("every tracker completes");
        assert_eq!(c.deliveries, 2);
        assert_eq!(c.succeeded + c.dead_lettered, 2, "{c:?}");
        total.succeeded += c.succeeded;
        total.dead_lettered += c.dead_lettered;
    }
    bus.flush(WAIT).unwrap();
    assert_eq!(callbacks.load(Ordering::SeqCst), trackers.len() as u64);
    let stats = bus.stats();
    assert_eq!(u64::from(total.succeeded), stats.succeeded);
    assert_eq!(u64::from(total.dead_lettered), stats.dead_lettered);
    assert!(bus.shutdown().unwrap().is_balanced());
}

#[test]
fn an_envelope_publish_can_be_tracked() {
    let bus = Bus::builder().workers(1).build().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    {
        let seen = seen.clone();
        bus.subscribe(move |_: &Numbered, ctx: &Context| -> HandlerResult {
            seen.lock().unwrap().push(ctx.event_id());
            Ok(())
        })
        .unwrap();
    }
    let envelope: microbus::Envelope = serde_json::from_str(&format!(
        r#"{{"id":"{}","correlation_id":"{}","causation_id":null,"source":"payments","key":null}}"#,
        microbus::EventId::new(),
        microbus::EventId::new()
    ))
    .unwrap();
    let tracker = bus
        .publish_with(
            Numbered {
                publisher: 0,
                seq: 0,
            },
            Publish::envelope(envelope.clone()).tracked(),
        )
        .unwrap();
    assert!(tracker.wait(WAIT).unwrap().all_succeeded());
    assert_eq!(tracker.event_id(), envelope.id());
    assert_eq!(*seen.lock().unwrap(), [envelope.id()]);
    bus.shutdown().unwrap();
}

#[test]
fn a_forwarded_envelope_does_not_carry_the_tracker() {
    // A handler forwards its event to another bus with a copy of its envelope (the documented
    // way for an event to re-enter a bus): the copy is not tracked, and the original tracker
    // counts the original deliveries only.
    let other = Bus::builder().workers(1).build().unwrap();
    let (forwarded_tx, forwarded) = crossbeam_channel::unbounded();
    other
        .subscribe(move |e: &Numbered, ctx: &Context| -> HandlerResult {
            forwarded_tx.send((e.seq, ctx.event_id())).unwrap();
            Ok(())
        })
        .unwrap();
    let bus = Bus::builder().workers(1).build().unwrap();
    {
        let other = other.clone();
        bus.subscribe(move |e: &Numbered, ctx: &Context| -> HandlerResult {
            other
                .publish_with(e.clone(), Publish::envelope(ctx.envelope().clone()))
                .unwrap();
            // Serialized and read back, as a bridge would carry it.
            let json = serde_json::to_string(ctx.envelope()).unwrap();
            other
                .publish_with(
                    e.clone(),
                    Publish::envelope(serde_json::from_str(&json).unwrap()),
                )
                .unwrap();
            // Both copies have been handled over there before this delivery settles.
            other.flush(WAIT).unwrap();
            Ok(())
        })
        .unwrap();
    }
    bus.subscribe(|_: &Numbered, _: &Context| -> HandlerResult { Ok(()) })
        .unwrap();
    let tracker = tracked(&bus, 5);
    let done = tracker.wait(WAIT).unwrap();
    assert_eq!((done.deliveries, done.succeeded), (2, 2), "{done:?}");
    let id = tracker.event_id();
    assert_eq!(forwarded.try_iter().collect::<Vec<_>>(), [(5, id), (5, id)]);
    assert!(bus.shutdown().unwrap().is_balanced());
    assert!(other.shutdown().unwrap().is_balanced());
}

#[test]
fn cloned_options_and_envelopes_keep_everything_but_the_tracker() {
    let options = Publish::keyed(9u64).header("tenant", "acme");
    let bus = Bus::builder().workers(1).build().unwrap();
    let (seen_tx, seen) = crossbeam_channel::unbounded();
    bus.subscribe(move |_: &Numbered, ctx: &Context| -> HandlerResult {
        seen_tx.send(ctx.envelope().clone()).unwrap();
        Ok(())
    })
    .unwrap();
    let tracker = bus
        .publish_with(
            Numbered {
                publisher: 0,
                seq: 1,
            },
            options.clone().tracked(),
        )
        .unwrap();
    assert_eq!(tracker.wait(WAIT).unwrap().succeeded, 1);
    let envelope = seen.recv().unwrap();
    assert_eq!(envelope.key(), Some(9u64.into()));
    assert_eq!(envelope.headers().get("tenant"), Some("acme"));
    assert_eq!(envelope.clone(), envelope);
    // Publishing the same envelope again is a new, untracked publish: the tracker's
    // completion does not move.
    bus.publish_with(
        Numbered {
            publisher: 0,
            seq: 1,
        },
        Publish::envelope(envelope),
    )
    .unwrap();
    bus.flush(WAIT).unwrap();
    let done = tracker.completion().unwrap();
    assert_eq!((done.deliveries, done.succeeded), (1, 1), "{done:?}");
    assert!(bus.shutdown().unwrap().is_balanced());
}

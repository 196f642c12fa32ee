//! Shutdown: everything accepted is handled, nothing is lost or doubled, the deadline holds,
//! and the report adds up.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{FollowUp, Held, Numbered, Tally, WAIT, count, hold_the_only_worker};
use microbus::{Bus, Context, Deferred, HandlerError, HandlerResult, PublishError, RetryPolicy};

#[test]
fn shutdown_handles_everything_queued_before_it_returns() {
    const EVENTS: u64 = 10_000;
    let Held {
        bus,
        release,
        entered,
        handled,
    } = hold_the_only_worker(EVENTS as usize);
    for seq in 0..EVENTS {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    entered.recv().unwrap();
    let stopper = {
        let bus = bus.clone();
        std::thread::spawn(move || bus.shutdown_timeout(WAIT))
    };
    // Wait until intake is closed (an event nobody subscribes to is refused), then let the
    // worker go.
    while bus
        .try_publish(FollowUp {
            parent: 0,
            index: 0,
        })
        .is_ok()
    {
        std::thread::yield_now();
    }
    assert!(handled.lock().unwrap().is_empty());
    release.send(()).unwrap();
    let report = stopper.join().unwrap().unwrap();
    assert_eq!(handled.lock().unwrap().len() as u64, EVENTS);
    assert!(!report.deadline_passed, "{report:?}");
    assert_eq!(report.stats.succeeded, EVENTS);
    assert_eq!(report.stats.left, 0);
    assert!(report.is_balanced(), "{report}");
    assert_eq!(
        bus.shutdown().unwrap(),
        report,
        "a second call returns the same report"
    );
}

#[test]
fn publishers_blocked_on_full_shards_get_their_events_back() {
    const PER_PUBLISHER: u64 = 20_000;
    let bus = Bus::builder()
        .workers(2)
        .channel_capacity(4)
        .build()
        .unwrap();
    let tally = Arc::new(Tally::new(3 * PER_PUBLISHER as usize));
    {
        let tally = tally.clone();
        bus.subscribe(move |e: &Numbered, _: &Context| -> HandlerResult {
            tally.mark((u64::from(e.publisher) * PER_PUBLISHER + e.seq) as usize);
            std::hint::black_box((0..200).sum::<u64>());
            Ok(())
        })
        .unwrap();
    }
    let accepted = Arc::new(AtomicU64::new(0));
    let publishers: Vec<_> = (0..3u32)
        .map(|publisher| {
            let (bus, accepted) = (bus.clone(), accepted.clone());
            std::thread::spawn(move || {
                let mut returned = Vec::new();
                for seq in 0..PER_PUBLISHER {
                    match bus.publish(Numbered { publisher, seq }) {
                        Ok(_id) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(PublishError::Shutdown(e)) => {
                            assert_eq!((e.publisher, e.seq), (publisher, seq));
                            returned.push(u64::from(publisher) * PER_PUBLISHER + seq);
                        }
                        Err(_) => unreachable!("not a rayon thread"),
                    }
                }
                returned
            })
        })
        .collect();
    while count(&accepted) < 2_000 {
        std::thread::yield_now();
    }
    let report = bus.shutdown_timeout(WAIT).unwrap();
    let returned: Vec<u64> = publishers
        .into_iter()
        .flat_map(|p| p.join().unwrap())
        .collect();
    assert!(
        !returned.is_empty(),
        "shutdown came before the publishers were done"
    );
    tally.assert_handled_or_returned(&returned);
    assert_eq!(report.stats.delivered, count(&accepted));
    assert_eq!(report.stats.succeeded, count(&accepted));
    // The report is taken when shutdown returns; publishers kept being refused after that.
    assert!(report.stats.refused <= returned.len() as u64);
    assert_eq!(bus.stats().refused, returned.len() as u64);
    assert_eq!(count(&accepted) + returned.len() as u64, 3 * PER_PUBLISHER);
    assert!(report.is_balanced(), "{report}");
}

#[test]
fn the_deadline_holds_against_a_stuck_handler() {
    let Held {
        bus,
        release,
        entered,
        handled,
    } = hold_the_only_worker(64);
    for seq in 0..10 {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    let stuck_id = entered.recv().unwrap();
    let other = bus
        .subscribe(|_: &FollowUp, _: &Context| -> HandlerResult { Ok(()) })
        .unwrap();
    let report = bus.shutdown_timeout(Duration::from_millis(50)).unwrap();
    // The detached worker is still inside its handler; unsubscribing does not wait for it.
    other.unsubscribe();
    assert!(!other.is_active());
    assert!(report.deadline_passed);
    assert_eq!(report.stats.abandoned, 1);
    assert_eq!(report.stats.left, 9);
    assert_eq!(report.stats.succeeded, 0);
    assert_eq!(report.stats.delivered, 10);
    assert!(report.is_balanced(), "{report}");
    assert_eq!(report.abandoned.len(), 1);
    let abandoned = &report.abandoned[0];
    assert_eq!(abandoned.event, "Numbered");
    assert_eq!(abandoned.event_id, Some(stuck_id));
    assert_eq!(abandoned.worker, "microbus-worker-0");
    assert!(report.to_string().contains(&stuck_id.to_string()));
    // The detached worker finishes its handler and exits; what it had queued was swept.
    release.send(()).unwrap();
    while handled.lock().unwrap().is_empty() {
        std::thread::yield_now();
    }
    assert_eq!(*handled.lock().unwrap(), vec![0]);
}

/// A worker detached inside a handler, with an earlier delivery of the same event failed (held
/// for retry) and another deferred: the report counts the held retry as discarded and the
/// deferral as abandoned, and when the handler returns at last the worker neither
/// dead-letters the held retry nor settles anything twice.
#[test]
fn a_detached_worker_does_not_settle_what_shutdown_reported() {
    let bus = Bus::builder()
        .workers(1)
        .retry(RetryPolicy::fixed(Duration::from_millis(1)).max_attempts(3))
        .build()
        .unwrap();
    bus.subscribe(|_: &Numbered, _: &Context| -> HandlerResult { Err(HandlerError::msg("fails")) })
        .unwrap();
    let (deferred_tx, deferred_rx) = crossbeam_channel::unbounded::<Deferred>();
    bus.subscribe(move |_: &Numbered, ctx: &Context| -> HandlerResult {
        deferred_tx.send(ctx.defer()).unwrap();
        Ok(())
    })
    .unwrap();
    let (entered_tx, entered_rx) = crossbeam_channel::bounded(1);
    let (release_tx, release_rx) = crossbeam_channel::bounded::<()>(1);
    let (returned_tx, returned_rx) = crossbeam_channel::bounded(1);
    bus.subscribe(move |_: &Numbered, _: &Context| -> HandlerResult {
        entered_tx.send(()).unwrap();
        release_rx.recv().unwrap();
        returned_tx.send(()).unwrap();
        Ok(())
    })
    .unwrap();
    bus.publish(Numbered {
        publisher: 0,
        seq: 0,
    })
    .unwrap();
    entered_rx.recv_timeout(WAIT).unwrap();
    let deferred = deferred_rx.recv_timeout(WAIT).unwrap();
    let report = bus.shutdown_timeout(Duration::from_millis(50)).unwrap();
    assert!(report.is_balanced(), "{report}");
    assert_eq!(report.stats.delivered, 3);
    assert_eq!(report.stats.discarded, 1, "{report}");
    assert_eq!(report.stats.abandoned, 2, "{report}");
    let mut workers: Vec<&str> = report.abandoned.iter().map(|a| a.worker.as_str()).collect();
    workers.sort_unstable();
    assert_eq!(workers, ["deferred", "microbus-worker-0"]);
    release_tx.send(()).unwrap();
    returned_rx.recv_timeout(WAIT).unwrap();
    deferred.succeed();
    // Give the detached worker time to finish with the event.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(bus.dead_letters().len(), 0);
    assert_eq!(bus.stats(), report.stats);
}

#[test]
fn concurrent_shutdowns_agree() {
    let bus = Bus::builder().workers(2).build().unwrap();
    bus.subscribe(|_: &Numbered, _: &Context| -> HandlerResult { Ok(()) })
        .unwrap();
    for seq in 0..1_000 {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    let stoppers: Vec<_> = (0..3)
        .map(|_| {
            let bus = bus.clone();
            std::thread::spawn(move || bus.shutdown().unwrap())
        })
        .collect();
    let reports: Vec<_> = stoppers.into_iter().map(|s| s.join().unwrap()).collect();
    assert!(reports.iter().all(|r| *r == reports[0]));
    assert_eq!(reports[0].stats.succeeded, 1_000);
}

//! Lifetime: flush and shutdown refuse to wait for themselves, and the last handle shuts the
//! bus down and joins its threads.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Numbered, WAIT, count, hold_the_only_worker};
use microbus::{Bus, Context, HandlerResult, ShutdownError};

#[test]
fn flush_and_shutdown_from_a_handler_are_errors() {
    let bus = Bus::builder().workers(1).build().unwrap();
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    {
        let (captured, outcomes) = (bus.clone(), outcomes.clone());
        bus.subscribe(move |_: &Numbered, _: &Context| -> HandlerResult {
            let flush = captured.flush(Duration::from_secs(1));
            let shutdown = captured.shutdown();
            outcomes
                .lock()
                .unwrap()
                .push((flush.map_err(|e| e.is_in_handler()), shutdown.map(|_| ())));
            Ok(())
        })
        .unwrap();
    }
    bus.publish(Numbered {
        publisher: 0,
        seq: 0,
    })
    .unwrap();
    bus.flush(WAIT).unwrap();
    assert_eq!(
        *outcomes.lock().unwrap(),
        vec![(Err(true), Err(ShutdownError::InHandler))]
    );
    // The bus still works, and shuts down from outside.
    bus.publish(Numbered {
        publisher: 0,
        seq: 1,
    })
    .unwrap();
    let report = bus.shutdown().unwrap();
    assert_eq!(report.stats.succeeded, 2);
}

#[test]
fn dropping_the_last_handle_handles_what_was_accepted_and_joins_the_workers() {
    let token = Arc::new(());
    let handled = Arc::new(AtomicU64::new(0));
    {
        let bus = Bus::builder().workers(2).build().unwrap();
        let service = bus.service("Other").unwrap();
        let sub = {
            let (token, handled) = (token.clone(), handled.clone());
            service
                .subscribe(move |_: &Numbered, _: &Context| -> HandlerResult {
                    let _keep = &token;
                    handled.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                })
                .unwrap()
        };
        drop(sub);
        for seq in 0..1_000 {
            bus.publish(Numbered { publisher: 0, seq }).unwrap();
        }
        drop(service);
        assert_eq!(Arc::strong_count(&token), 2);
        drop(bus);
    }
    assert_eq!(count(&handled), 1_000);
    // The handler was dropped with the bus's state, which every worker thread held: they are
    // all gone.
    assert_eq!(Arc::strong_count(&token), 1);
}

#[test]
fn a_flush_timeout_says_what_remains() {
    let held = hold_the_only_worker(1024);
    for seq in 0..5 {
        held.bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    held.entered.recv().unwrap();
    let bus = &held.bus;
    let err = bus.flush(Duration::from_millis(20)).unwrap_err();
    assert!(err.is_timeout());
    let pending = err.pending().unwrap();
    assert_eq!(
        (pending.queued, pending.running, pending.waiting),
        (4, 1, 0)
    );
    assert_eq!(
        err.to_string(),
        "flush timed out with 4 queued, 1 running and 0 waiting on the timer"
    );
    held.release.send(()).unwrap();
    bus.flush(WAIT).unwrap();
    assert_eq!(held.handled(), vec![0, 1, 2, 3, 4]);
}

#[test]
fn a_long_handler_sees_the_bus_shutting_down() {
    let bus = Bus::builder().workers(1).build().unwrap();
    let (entered_tx, entered_rx) = crossbeam_channel::bounded(1);
    let stopped_early = Arc::new(AtomicU64::new(0));
    {
        let stopped_early = stopped_early.clone();
        bus.subscribe(move |_: &Numbered, ctx: &Context| -> HandlerResult {
            entered_tx.send(()).unwrap();
            while !ctx.is_shutting_down() {
                std::thread::yield_now();
            }
            stopped_early.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
    }
    bus.publish(Numbered {
        publisher: 0,
        seq: 0,
    })
    .unwrap();
    entered_rx.recv().unwrap();
    let report = bus.shutdown_timeout(WAIT).unwrap();
    assert_eq!(count(&stopped_early), 1);
    assert!(!report.deadline_passed);
    assert_eq!(report.stats.succeeded, 1);
}

#[test]
fn the_last_handle_dropped_inside_a_handler_still_shuts_the_bus_down() {
    let token = Arc::new(());
    let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(1);
    {
        let bus = Bus::builder().workers(1).build().unwrap();
        let captured = Arc::new(Mutex::new(Some(bus.clone())));
        {
            let (token, captured) = (token.clone(), captured.clone());
            bus.subscribe(move |_: &Numbered, _: &Context| -> HandlerResult {
                let _keep = &token;
                go_rx.recv().unwrap();
                // The last handle goes away on the worker: the bus cannot join this thread
                // from here, so another thread shuts it down.
                drop(captured.lock().unwrap().take());
                Ok(())
            })
            .unwrap();
        }
        bus.publish(Numbered {
            publisher: 0,
            seq: 0,
        })
        .unwrap();
    }
    // Our handle is gone; the handler holds the last one until we let it go.
    assert_eq!(Arc::strong_count(&token), 2);
    go_tx.send(()).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while Arc::strong_count(&token) > 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the bus was not shut down"
        );
        std::thread::yield_now();
    }
}

/// Counts its drops.
struct Dropped(Arc<AtomicU64>);

impl Drop for Dropped {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn a_stopped_bus_lets_go_of_its_handlers_and_callbacks() {
    let drops = Arc::new(AtomicU64::new(0));
    let owned = || Dropped(drops.clone());
    let (hook, sink) = (owned(), owned());
    let bus = Bus::builder()
        .workers(1)
        .retry(microbus::RetryPolicy::none())
        .dead_letter_capacity(1)
        .on_dead_letter(move |_| {
            let _ = &hook;
        })
        .dead_letter_sink(move |_| {
            let _ = &sink;
        })
        .build()
        .unwrap();
    {
        // A handler that captures a handle of its own bus: a cycle through the handler tables
        // until the bus stops. Its failures leave dead letters that can reach it too.
        let (captured, value) = (bus.clone(), owned());
        bus.subscribe(move |_: &Numbered, _: &Context| -> HandlerResult {
            let _ = (&captured, &value);
            Err(microbus::HandlerError::msg("no"))
        })
        .unwrap();
    }
    {
        let value = owned();
        bus.tap(move |_| {
            let _ = &value;
        });
    }
    for seq in 0..3 {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    bus.flush(WAIT).unwrap();
    assert_eq!(count(&drops), 0);
    assert!(bus.shutdown().unwrap().is_balanced());
    // The handler (and the handle it held), the tap, the hook and the sink are gone.
    assert_eq!(count(&drops), 4);
    assert_eq!(bus.dead_letters().len(), 1);
    assert!(
        bus.dead_letters().list()[0]
            .payload_json()
            .contains("\"seq\":2")
    );
}

//! Drop accounting: every event value the bus was given is dropped exactly once — handled,
//! retried, dead-lettered (and evicted), left in a channel or on the timer at shutdown, handed
//! back to its publisher, or held by a handler past the deadline. None leaks, none is dropped
//! twice (the bus never clones or re-creates an event it was given).

mod common;

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{WAIT, quiet_worker_panics};
use microbus::{Bus, Context, Event, HandlerError, HandlerResult, Publish, RetryPolicy};
use serde::{Deserialize, Serialize};

const IDS: usize = 40_000;

/// How many times the event with each id was dropped.
static DROPS: LazyLock<Vec<AtomicU32>> =
    LazyLock::new(|| (0..IDS).map(|_| AtomicU32::new(0)).collect());

#[derive(Debug, Serialize, Deserialize)]
struct Tracked {
    id: u32,
}

impl Event for Tracked {
    const NAME: &'static str = "Tracked";
}

impl Drop for Tracked {
    fn drop(&mut self) {
        DROPS[self.id as usize].fetch_add(1, Ordering::SeqCst);
    }
}

/// The ids in `range` not dropped exactly once, with their counts.
fn wrong_drops(range: std::ops::Range<u32>) -> Vec<(u32, u32)> {
    range
        .map(|id| (id, DROPS[id as usize].load(Ordering::SeqCst)))
        .filter(|&(_, n)| n != 1)
        .collect()
}

/// Waits until every id in `range` was dropped (a detached worker may still hold one).
fn wait_for_drops(range: std::ops::Range<u32>) -> Vec<(u32, u32)> {
    let deadline = Instant::now() + WAIT;
    loop {
        let wrong = wrong_drops(range.clone());
        if wrong.is_empty() || Instant::now() > deadline {
            return wrong;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn every_event_is_dropped_once_through_successes_retries_and_dead_letters() {
    quiet_worker_panics();
    const EVENTS: u32 = 12_000;
    let bus = Bus::builder()
        .workers(2)
        .channel_capacity(8)
        .retry(RetryPolicy::fixed(Duration::from_millis(1)).max_attempts(2))
        // Small: most dead letters are evicted from the ring, and dropped then.
        .dead_letter_capacity(50)
        .build()
        .unwrap();
    let runs = std::sync::Arc::new(AtomicU64::new(0));
    for _ in 0..2 {
        let runs = runs.clone();
        bus.subscribe(move |e: &Tracked, ctx: &Context| -> HandlerResult {
            runs.fetch_add(1, Ordering::Relaxed);
            match e.id % 10 {
                0 => Err(HandlerError::msg("always")),
                1 => Err(HandlerError::permanent(HandlerError::msg("never"))),
                2 if ctx.attempt() == 1 => panic!("once"),
                _ => Ok(()),
            }
        })
        .unwrap();
    }
    std::thread::scope(|s| {
        let bus = &bus;
        s.spawn(move || {
            for id in 0..EVENTS / 2 {
                bus.publish(Tracked { id }).unwrap();
            }
        });
        s.spawn(move || {
            let items =
                (EVENTS / 2..EVENTS).map(|id| (Tracked { id }, Publish::keyed(u64::from(id))));
            bus.publish_batch_with(items).unwrap();
        });
    });
    bus.flush(WAIT).unwrap();
    assert!(bus.dead_letters().evicted() > 0);
    // Handled and retried events are gone already; the dead letters in the ring still hold
    // theirs (the two subscriptions' dead letters of one event share it).
    let held: Vec<u32> = wrong_drops(0..EVENTS)
        .into_iter()
        .map(|(id, n)| {
            assert_eq!(n, 0, "event {id}");
            id
        })
        .collect();
    let mut in_ring: Vec<u32> = bus
        .dead_letters()
        .list()
        .iter()
        .map(|l| {
            let payload: serde_json::Value = serde_json::from_str(l.payload_json()).unwrap();
            payload["id"].as_u64().unwrap() as u32
        })
        .collect();
    in_ring.sort_unstable();
    in_ring.dedup();
    assert_eq!(held, in_ring);
    let report = bus.shutdown().unwrap();
    assert!(report.is_balanced(), "{report}");
    drop(bus);
    assert_eq!(wait_for_drops(0..EVENTS), vec![]);
}

#[test]
fn events_left_at_shutdown_are_dropped_once_wherever_they_wait() {
    const FIRST: u32 = 20_000;
    const EVENTS: u32 = 3_000;
    let bus = Bus::builder()
        .workers(1)
        .channel_capacity(16)
        .metrics(false)
        .retry(RetryPolicy::fixed(Duration::from_secs(3600)).max_attempts(3))
        .build()
        .unwrap();
    let (entered_tx, entered) = crossbeam_channel::bounded(1);
    let (release, release_rx) = crossbeam_channel::bounded::<()>(1);
    bus.subscribe(move |e: &Tracked, _: &Context| -> HandlerResult {
        match e.id % 4 {
            // Held past the shutdown deadline: abandoned, its worker detached.
            _ if e.id == FIRST + 100 => {
                entered_tx.send(()).unwrap();
                release_rx.recv().unwrap();
                Ok(())
            }
            // Waits on the timer for an hour: dead-lettered at shutdown.
            0 => Err(HandlerError::msg("later")),
            _ => Ok(()),
        }
    })
    .unwrap();
    let returned = AtomicU64::new(0);
    std::thread::scope(|s| {
        let (bus, returned) = (&bus, &returned);
        let publisher = s.spawn(move || {
            for id in FIRST..FIRST + EVENTS {
                // Blocked on the full shard when shutdown comes: handed back, dropped here.
                if bus.publish(Tracked { id }).is_err() {
                    returned.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        entered.recv().unwrap();
        // Let the publisher fill the channel behind the held handler.
        while bus.metrics().queue_depth[0] < 16 {
            std::thread::yield_now();
        }
        let report = bus.shutdown_timeout(Duration::from_millis(50)).unwrap();
        publisher.join().unwrap();
        assert!(report.is_balanced(), "{report}");
        assert_eq!(report.stats.abandoned, 1);
        assert!(report.stats.left >= 16, "{report}");
        assert!(report.stats.dead_lettered > 0, "{report}");
    });
    assert!(returned.load(Ordering::Relaxed) > 0);
    drop(bus);
    // The held event goes when its handler returns; the detached worker then exits and lets
    // go of the bus, and the dead letters' events go with it.
    assert_eq!(DROPS[(FIRST + 100) as usize].load(Ordering::SeqCst), 0);
    release.send(()).unwrap();
    assert_eq!(wait_for_drops(FIRST..FIRST + EVENTS), vec![]);
}

//! rayon and the bus together: publishing from parallel iterators (one event at a time and
//! grouped per shard), handlers that use rayon, and the deadlock a full shard could cause
//! between the two — every event handled or handed back, never lost, never doubled.
#![cfg(feature = "rayon")]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Numbered, Tally, WAIT};
use microbus::{Bus, Context, HandlerResult, Publish, PublishError};
use rayon::prelude::*;

/// Runs `scenario` on its own thread and fails, instead of hanging, if it does not finish.
fn within<T: Send + 'static>(what: &str, scenario: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = tx.send(scenario());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("{what}: deadlocked (no end in 60 s)"))
}

/// A bus of 2 workers with channels of `capacity` whose handler of `Numbered` marks each of
/// the `n` events in the returned tally.
fn tallying(capacity: usize, n: u64) -> (Bus, Arc<Tally>) {
    let bus = Bus::builder()
        .workers(2)
        .channel_capacity(capacity)
        .build()
        .unwrap();
    let tally = Arc::new(Tally::new(n as usize));
    let marks = tally.clone();
    bus.subscribe(move |e: &Numbered, _: &Context| -> HandlerResult {
        marks.mark(e.seq as usize);
        Ok(())
    })
    .unwrap();
    (bus, tally)
}

#[test]
fn publish_par_iter_publishes_every_event_once() {
    const N: u64 = 200_000;
    let (bus, tally) = tallying(64, N);
    bus.publish_par_iter(
        (0..N / 2)
            .into_par_iter()
            .map(|seq| Numbered { publisher: 0, seq }),
    )
    .unwrap();
    // Keyed, each with its own options.
    bus.publish_par_iter_with(
        (N / 2..N)
            .into_par_iter()
            .map(|seq| (Numbered { publisher: 1, seq }, Publish::keyed(seq % 7))),
    )
    .unwrap();
    bus.flush(WAIT).unwrap();
    assert_eq!(tally.not_once(), vec![]);
    let stats = bus.stats();
    assert_eq!((stats.delivered, stats.succeeded), (N, N));
    assert_eq!(bus.metrics().events[0].published, N);
}

#[test]
fn publishing_one_by_one_from_rayon_tasks_is_exact_under_backpressure() {
    const N: u64 = 100_000;
    let (bus, tally) = tallying(8, N);
    let returned = Mutex::new(Vec::new());
    (0..N).into_par_iter().for_each(|seq| {
        // The workers keep up (they never wait for the pool), so events come back only if a
        // worker is kept off the CPU for 100 ms and its overflow fills meanwhile.
        if let Err(e) = bus.publish(Numbered { publisher: 0, seq }) {
            assert!(e.is_full());
            returned.lock().unwrap().push(e.into_event());
        }
    });
    bus.flush(WAIT).unwrap();
    let returned = returned.into_inner().unwrap();
    tally.assert_handled_or_returned(&returned.iter().map(|e| e.seq).collect::<Vec<_>>());
    for event in returned {
        bus.publish(event).unwrap();
    }
    bus.flush(WAIT).unwrap();
    assert_eq!(tally.not_once(), vec![]);
    assert_eq!(bus.stats().succeeded, N);
}

#[test]
fn handlers_use_rayon_from_the_bus_own_worker_threads() {
    const N: u64 = 200;
    let bus = Bus::builder().workers(2).build().unwrap();
    let sums = Arc::new(AtomicU64::new(0));
    let on_pool = Arc::new(AtomicU64::new(0));
    {
        let (sums, on_pool) = (sums.clone(), on_pool.clone());
        bus.subscribe(move |e: &Numbered, _: &Context| -> HandlerResult {
            if rayon::current_thread_index().is_some() {
                on_pool.fetch_add(1, Ordering::Relaxed);
            }
            let sum: u64 = (0..=e.seq).into_par_iter().sum();
            sums.fetch_add(sum, Ordering::Relaxed);
            Ok(())
        })
        .unwrap();
    }
    for seq in 0..N {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    bus.flush(WAIT).unwrap();
    let want: u64 = (0..N).map(|n| n * (n + 1) / 2).sum();
    assert_eq!(sums.load(Ordering::Relaxed), want);
    assert_eq!(
        on_pool.load(Ordering::Relaxed),
        0,
        "a handler ran on rayon's pool"
    );
}

/// A rayon pool of 2 threads, and a bus of 1 worker with tiny queues: a channel of
/// `capacity` and an overflow of `overflow`.
fn pool_and_bus(capacity: usize, overflow: usize) -> (Arc<rayon::ThreadPool>, Bus) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let bus = Bus::builder()
        .workers(1)
        .channel_capacity(capacity)
        .spill_capacity(overflow)
        .build()
        .unwrap();
    (Arc::new(pool), bus)
}

/// The plain case of that deadlock: the pool has one thread, a task on it publishes events
/// one after another, and the only worker's handler waits for the same pool. The publisher
/// runs the handler's job while it waits for room, so every event goes through and none
/// comes back.
#[test]
fn a_publisher_on_a_pool_runs_the_job_of_a_handler_waiting_for_that_pool() {
    const N: u64 = 2_000;
    let (tally, returned) = within("a one-thread pool publishing", || {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let pool = Arc::new(pool);
        let (bus, tally) = tallying(1, N);
        let inner = pool.clone();
        bus.subscribe(move |_: &Numbered, _: &Context| -> HandlerResult {
            let sum: u64 = inner.install(|| (0..64u64).into_par_iter().sum());
            assert_eq!(sum, 2_016);
            Ok(())
        })
        .unwrap();
        let returned: Vec<u64> = pool.install(|| {
            (0..N)
                .filter_map(|seq| bus.publish(Numbered { publisher: 0, seq }).err())
                .map(|e| e.into_event().seq)
                .collect()
        });
        bus.flush(WAIT).unwrap();
        (tally, returned)
    });
    assert!(returned.is_empty(), "{} of {N} came back", returned.len());
    assert_eq!(tally.not_once(), vec![]);
}

/// The deadlock the policy exists for: a pool's threads all publish into a full shard while
/// the shard's worker runs a handler that waits for the same pool. Tiny capacities make it
/// happen at once. Nothing deadlocks: each event is handled, or handed back once the worker
/// is seen stuck and the shard's overflow is full; the caller then publishes what came back
/// from outside the pool, and every event is handled exactly once.
#[test]
fn publishers_on_a_pool_never_deadlock_with_a_handler_waiting_for_that_pool() {
    const N: u64 = 20_000;
    let (tally, returned, stats) = within("pool publishers against a pool handler", || {
        let (pool, bus) = pool_and_bus(1, 4);
        let tally = Arc::new(Tally::new(N as usize));
        {
            let (tally, pool) = (tally.clone(), pool.clone());
            bus.subscribe(move |e: &Numbered, _: &Context| -> HandlerResult {
                // Waits for the pool whose threads are the publishers.
                let sum: u64 = pool.install(|| (0..64u64).into_par_iter().sum());
                assert_eq!(sum, 2_016);
                tally.mark(e.seq as usize);
                Ok(())
            })
            .unwrap();
        }
        let returned = Mutex::new(Vec::new());
        pool.install(|| {
            (0..N).into_par_iter().for_each(|seq| {
                if let Err(e) = bus.publish(Numbered { publisher: 0, seq }) {
                    assert!(e.is_full(), "only a full overflow hands events back");
                    returned.lock().unwrap().push(e.into_event().seq);
                }
            });
        });
        bus.flush(WAIT).unwrap();
        let returned = returned.into_inner().unwrap();
        tally.assert_handled_or_returned(&returned);
        // From this thread, which is not the pool's, a publish waits for room as usual.
        for &seq in &returned {
            bus.publish(Numbered { publisher: 0, seq }).unwrap();
        }
        bus.flush(WAIT).unwrap();
        let report = bus.shutdown().unwrap();
        assert!(report.is_balanced(), "{report}");
        (tally, returned, report.stats)
    });
    assert_eq!(tally.not_once(), vec![]);
    assert_eq!(stats.succeeded, N);
    println!(
        "same pool: {} of {N} handed back, then published from outside it",
        returned.len()
    );
}

/// The worse case: the handler's own rayon work publishes into the handler's shard, which is
/// full. Waiting could only deadlock (the worker waits for the pool, the pool for the
/// worker): once the worker makes no progress, the events go to the shard's overflow queue
/// and, when that is full too, come back as `PublishError::Full`. Each is handled or
/// returned.
#[test]
fn a_handler_whose_rayon_work_publishes_into_its_own_full_shard_gets_events_back() {
    const PARENTS: u64 = 10;
    const CHILDREN: u64 = 50;
    let (tally, returned, stats) = within("a handler's rayon work publishing", || {
        let (pool, bus) = pool_and_bus(2, 8);
        let children = Arc::new(Tally::new((PARENTS * CHILDREN) as usize));
        let returned: Arc<Mutex<Vec<u64>>> = Arc::default();
        let handle: Arc<Mutex<Option<Bus>>> = Arc::new(Mutex::new(Some(bus.clone())));
        {
            let (children, returned, pool, handle) = (
                children.clone(),
                returned.clone(),
                pool.clone(),
                handle.clone(),
            );
            bus.subscribe(move |e: &Numbered, _: &Context| -> HandlerResult {
                if e.publisher == 1 {
                    children.mark(e.seq as usize);
                    return Ok(());
                }
                let Some(bus) = handle.lock().unwrap().clone() else {
                    return Ok(());
                };
                pool.install(|| {
                    (0..CHILDREN).into_par_iter().for_each(|i| {
                        let seq = e.seq * CHILDREN + i;
                        if let Err(err) = bus.publish(Numbered { publisher: 1, seq }) {
                            assert!(matches!(err, PublishError::Full(_)));
                            returned.lock().unwrap().push(err.into_event().seq);
                        }
                    });
                });
                Ok(())
            })
            .unwrap();
        }
        for seq in 0..PARENTS {
            bus.publish(Numbered { publisher: 0, seq }).unwrap();
        }
        bus.flush(WAIT).unwrap();
        handle.lock().unwrap().take();
        let report = bus.shutdown().unwrap();
        assert!(report.is_balanced(), "{report}");
        let returned = returned.lock().unwrap().clone();
        (children, returned, report.stats)
    });
    tally.assert_handled_or_returned(&returned);
    assert!(
        !returned.is_empty(),
        "the overflow never filled: the test lost its point"
    );
    assert_eq!(
        stats.succeeded,
        PARENTS + PARENTS * CHILDREN - returned.len() as u64
    );
    println!(
        "own shard: {} of {} children handed back",
        returned.len(),
        PARENTS * CHILDREN
    );
}

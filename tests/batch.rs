//! Batch publishing: every event once, per-key order, events handed back at shutdown, batches
//! staged by handlers, and the accounting of a batch the deadline cuts short.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{
    FollowUp, Held, Keyed, Numbered, Tally, WAIT, count, hold_the_only_worker, quiet_worker_panics,
};
use microbus::{Bus, Context, EventId, HandlerError, HandlerResult, Publish, RetryPolicy};

#[test]
fn every_event_of_a_batch_reaches_every_subscription_once() {
    const EVENTS: u64 = 10_000;
    let bus = Bus::builder().workers(4).build().unwrap();
    let tallies: Vec<Arc<Tally>> = (0..2)
        .map(|_| Arc::new(Tally::new(EVENTS as usize)))
        .collect();
    for tally in &tallies {
        let tally = tally.clone();
        bus.subscribe(move |e: &Numbered, _: &Context| -> HandlerResult {
            tally.mark(e.seq as usize);
            Ok(())
        })
        .unwrap();
    }
    // Batches of several sizes: below, at and above the 64 events of one message.
    let mut seq = 0;
    for size in [1u64, 63, 64, 65, 1000, 8807] {
        bus.publish_batch((seq..seq + size).map(|seq| Numbered { publisher: 0, seq }))
            .unwrap();
        seq += size;
    }
    assert_eq!(seq, EVENTS);
    bus.flush(WAIT).unwrap();
    for tally in &tallies {
        assert_eq!(tally.not_once(), vec![]);
    }
    let report = bus.shutdown().unwrap();
    assert_eq!(report.stats.delivered, 2 * EVENTS);
    assert_eq!(report.stats.succeeded, 2 * EVENTS);
    assert!(report.is_balanced(), "{report}");
}

#[test]
fn events_with_one_key_keep_their_order_across_batches_and_threads() {
    const KEYS: u64 = 64;
    const PER_THREAD: u64 = 20_000;
    let bus = Bus::builder()
        .workers(4)
        .channel_capacity(8)
        .build()
        .unwrap();
    let seen: Arc<Mutex<Vec<Vec<u64>>>> = Arc::new(Mutex::new(vec![Vec::new(); 2 * KEYS as usize]));
    for _ in 0..2 {
        let seen = seen.clone();
        bus.subscribe(move |e: &Keyed, _: &Context| -> HandlerResult {
            seen.lock().unwrap()[e.key as usize].push(e.seq);
            Ok(())
        })
        .unwrap();
    }
    std::thread::scope(|s| {
        for thread in 0..2u64 {
            let bus = &bus;
            s.spawn(move || {
                // Each thread has keys of its own; batches of 100 interleave them.
                let events: Vec<Keyed> = (0..PER_THREAD)
                    .map(|seq| Keyed {
                        key: thread * KEYS + seq % KEYS,
                        seq,
                    })
                    .collect();
                for chunk in events.chunks(100) {
                    let items = chunk.iter().map(|e| (e.clone(), Publish::keyed(e.key)));
                    bus.publish_batch_with(items).unwrap();
                }
            });
        }
    });
    bus.flush(WAIT).unwrap();
    let seen = seen.lock().unwrap();
    for (key, seqs) in seen.iter().enumerate() {
        // Two subscriptions: each sequence appears twice, and each subscription's copy is
        // in order; the interleaving of the two copies is free.
        let expected: Vec<u64> = (0..PER_THREAD)
            .filter(|seq| seq % KEYS == key as u64 % KEYS)
            .collect();
        assert_eq!(seqs.len(), 2 * expected.len(), "key {key}");
        let mut first = Vec::new();
        let mut second = Vec::new();
        let mut taken = HashSet::new();
        for &seq in seqs {
            if taken.insert(seq) {
                first.push(seq);
            } else {
                second.push(seq);
            }
        }
        assert_eq!(first, expected, "key {key}");
        assert_eq!(second, expected, "key {key}");
    }
    drop(seen);
    bus.shutdown().unwrap();
}

#[test]
fn batches_published_during_shutdown_are_handled_or_handed_back() {
    const PER_PUBLISHER: u64 = 30_000;
    let bus = Bus::builder()
        .workers(2)
        .channel_capacity(4)
        .build()
        .unwrap();
    let tally = Arc::new(Tally::new(3 * PER_PUBLISHER as usize));
    {
        let tally = tally.clone();
        bus.subscribe(move |e: &Numbered, _: &Context| -> HandlerResult {
            tally.mark(e.publisher as usize * PER_PUBLISHER as usize + e.seq as usize);
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
                for start in (0..PER_PUBLISHER).step_by(150) {
                    let end = (start + 150).min(PER_PUBLISHER);
                    let batch = (start..end).map(|seq| Numbered { publisher, seq });
                    match bus.publish_batch(batch) {
                        Ok(()) => {
                            accepted.fetch_add(end - start, Ordering::Relaxed);
                        }
                        Err(error) => {
                            let back = error.into_events();
                            accepted.fetch_add(end - start - back.len() as u64, Ordering::Relaxed);
                            returned.extend(back.into_iter().map(|e| {
                                assert_eq!(e.publisher, publisher);
                                u64::from(publisher) * PER_PUBLISHER + e.seq
                            }));
                        }
                    }
                }
                returned
            })
        })
        .collect();
    while count(&accepted) < 5_000 {
        std::thread::yield_now();
    }
    let report = bus.shutdown_timeout(WAIT).unwrap();
    let returned: Vec<u64> = publishers
        .into_iter()
        .flat_map(|p| p.join().unwrap())
        .collect();
    assert!(!returned.is_empty(), "shutdown came after the publishers");
    tally.assert_handled_or_returned(&returned);
    assert_eq!(count(&accepted) + returned.len() as u64, 3 * PER_PUBLISHER);
    assert_eq!(report.stats.succeeded, count(&accepted));
    assert_eq!(bus.stats().refused, returned.len() as u64);
    assert!(report.is_balanced(), "{report}");
}

#[test]
fn a_handler_stages_a_batch_that_leaves_only_when_it_succeeds() {
    let bus = Bus::builder()
        .workers(2)
        .retry(RetryPolicy::fixed(Duration::ZERO).max_attempts(2))
        .build()
        .unwrap();
    let parents: Arc<Mutex<Vec<(EventId, EventId)>>> = Arc::default();
    {
        let parents = parents.clone();
        bus.subscribe(move |e: &Numbered, ctx: &Context| -> HandlerResult {
            ctx.publish_batch((0..100u8).map(|index| FollowUp {
                parent: e.seq,
                index,
            }))?;
            if ctx.attempt() == 1 {
                return Err(HandlerError::msg("first attempt fails"));
            }
            parents
                .lock()
                .unwrap()
                .push((ctx.event_id(), ctx.correlation_id()));
            Ok(())
        })
        .unwrap();
    }
    let children = Arc::new(Tally::new(10 * 100));
    // (parent, causation, correlation) of each batch's first event.
    type Chain = (u64, Option<EventId>, EventId);
    let chains: Arc<Mutex<Vec<Chain>>> = Arc::default();
    {
        let (children, chains) = (children.clone(), chains.clone());
        bus.subscribe(move |e: &FollowUp, ctx: &Context| -> HandlerResult {
            children.mark(e.parent as usize * 100 + e.index as usize);
            if e.index == 0 {
                chains
                    .lock()
                    .unwrap()
                    .push((e.parent, ctx.causation_id(), ctx.correlation_id()));
            }
            Ok(())
        })
        .unwrap();
    }
    for seq in 0..10 {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    bus.flush(WAIT).unwrap();
    // The failed first attempts published nothing; the second attempts' batches arrived once.
    assert_eq!(children.not_once(), vec![]);
    let parents = parents.lock().unwrap().clone();
    let chains = chains.lock().unwrap().clone();
    assert_eq!(chains.len(), 10);
    for (_, causation, correlation) in chains {
        assert!(parents.contains(&(causation.unwrap(), correlation)));
    }
    let m = bus.metrics();
    assert_eq!(m.event("FollowUp", "app").unwrap().published, 1_000);
    let report = bus.shutdown().unwrap();
    assert_eq!(report.stats.succeeded, 10 + 1_000);
    assert!(report.is_balanced(), "{report}");
}

#[test]
fn a_batch_nobody_hears_is_counted_and_failures_in_a_batch_are_retried() {
    quiet_worker_panics();
    let bus = Bus::builder()
        .workers(1)
        .retry(RetryPolicy::fixed(Duration::ZERO).max_attempts(2))
        .build()
        .unwrap();
    bus.publish_batch((0..50).map(|seq| Numbered { publisher: 0, seq }))
        .unwrap();
    assert_eq!(bus.stats().unmatched, 50);
    let attempts = Arc::new(AtomicU64::new(0));
    {
        let attempts = attempts.clone();
        bus.subscribe(move |e: &Keyed, ctx: &Context| -> HandlerResult {
            attempts.fetch_add(1, Ordering::Relaxed);
            match (e.seq % 10, ctx.attempt()) {
                (3, 1) => Err(HandlerError::msg("once")),
                (7, _) => panic!("always"),
                _ => Ok(()),
            }
        })
        .unwrap();
    }
    bus.publish_batch((0..200).map(|seq| Keyed { key: 0, seq }))
        .unwrap();
    bus.flush(WAIT).unwrap();
    // 200 first attempts; 20 retried once after an error; 20 panicking twice.
    assert_eq!(count(&attempts), 240);
    let stats = bus.stats();
    assert_eq!(stats.succeeded, 180);
    assert_eq!(stats.dead_lettered, 20);
    assert_eq!(stats.retried, 40);
    assert_eq!(bus.dead_letters().len(), 20);
    let m = bus.metrics();
    let counts = m.event("Numbered", "app").unwrap();
    assert_eq!((counts.published, counts.unmatched), (50, 50));
    assert_eq!(m.event("Keyed", "app").unwrap().published, 200);
    assert!(bus.shutdown().unwrap().is_balanced());
}

#[test]
fn a_deadline_in_the_middle_of_a_batch_leaves_the_rest_accounted_for() {
    let Held {
        bus,
        release,
        entered,
        handled,
    } = hold_the_only_worker(64);
    // Events 0..10 in one message; the handler holds event 0 past the deadline.
    bus.publish_batch((0..10).map(|seq| Numbered { publisher: 0, seq }))
        .unwrap();
    entered.recv().unwrap();
    let report = bus.shutdown_timeout(Duration::from_millis(50)).unwrap();
    assert_eq!(report.stats.abandoned, 1);
    assert_eq!(report.stats.left, 9);
    assert_eq!(report.stats.delivered, 10);
    assert!(report.is_balanced(), "{report}");
    release.send(()).unwrap();
    while handled.lock().unwrap().is_empty() {
        std::thread::yield_now();
    }
    // The detached worker exits after its handler: it runs nothing more of the batch.
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(*handled.lock().unwrap(), vec![0]);
}

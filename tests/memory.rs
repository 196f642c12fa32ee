//! Memory is per use and is given back: with metrics on, 10,000 subscriptions that each
//! handled a few events stay within a bounded heap, snapshot included, and subscriptions that
//! come and go leave (almost) nothing behind.
//!
//! Tests in their own binary: the counting allocator sees every thread of the process, so
//! they run one at a time under a lock.

mod common;

use std::sync::Mutex;

use common::live_heap::{LiveBytes, live};
use common::{Numbered, WAIT};
use microbus::{Bus, Context, HandlerResult, SubscribeOptions};

#[global_allocator]
static GLOBAL: LiveBytes = LiveBytes;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const MIB: i64 = 1 << 20;

#[test]
fn ten_thousand_subscriptions_with_metrics_fit_in_64_mib() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    const SUBSCRIPTIONS: u64 = if cfg!(miri) { 10 } else { 10_000 };
    const EVENTS: u64 = 10;
    let before = live();
    // Every delivery timed: each handler's histograms in use, the most memory they take.
    let bus = Bus::builder()
        .workers(2)
        .metrics_sample_every(1)
        .build()
        .unwrap();
    let mut subscriptions = Vec::new();
    for i in 0..SUBSCRIPTIONS {
        // Each subscription hears one service: 10 events each.
        let service = bus.service(&format!("s{}", i % 1_000)).unwrap();
        let options = SubscribeOptions::new()
            .named(format!("h{i}"))
            .from(format!("s{}", i % 1_000));
        subscriptions.push(
            service
                .subscribe_with(options, |_: &Numbered, _: &Context| -> HandlerResult {
                    Ok(())
                })
                .unwrap(),
        );
    }
    for i in 0..1_000u64 {
        let service = bus.service(&format!("s{i}")).unwrap();
        for seq in 0..EVENTS {
            service
                .publish(Numbered {
                    publisher: i as u32,
                    seq,
                })
                .unwrap();
        }
    }
    bus.flush(WAIT).unwrap();
    let snapshot = bus.metrics();
    assert_eq!(snapshot.handlers.len() as u64, SUBSCRIPTIONS);
    assert!(
        snapshot
            .handlers
            .iter()
            .all(|h| h.succeeded == EVENTS && h.handler_time.count == EVENTS)
    );
    let used = live() - before;
    println!(
        "{SUBSCRIPTIONS} subscriptions × {EVENTS} events, metrics on, 2 workers, with a \
         snapshot: {:.1} MiB live",
        used as f64 / MIB as f64
    );
    assert!(used < 64 * MIB, "{} MiB", used / MIB);
    drop(snapshot);
    drop(subscriptions);
    bus.shutdown().unwrap();
}

#[test]
fn subscriptions_that_come_and_go_give_their_memory_back() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    const CYCLES: i64 = if cfg!(miri) { 10 } else { 2_000 };
    let bus = Bus::builder().workers(2).build().unwrap();
    let cycle = |i: i64| {
        let sub = bus
            .subscribe_with(
                SubscribeOptions::new().named(format!("h{i}")),
                |_: &Numbered, _: &Context| -> HandlerResult { Ok(()) },
            )
            .unwrap();
        for seq in 0..4 {
            bus.publish(Numbered { publisher: 0, seq }).unwrap();
        }
        bus.flush(WAIT).unwrap();
        sub.unsubscribe();
        // A snapshot now and then, as a scraper would take.
        if i % 100 == 0 {
            drop(bus.metrics());
        }
    };
    // Warm up: caches, thread-locals, the tables' first growth, the removed rows' bound.
    for i in 0..CYCLES {
        cycle(i);
    }
    let before = live();
    for i in CYCLES..2 * CYCLES {
        cycle(i);
    }
    let grown = live() - before;
    println!(
        "subscribe, publish 4, unsubscribe: {:.1} bytes a cycle over {CYCLES} cycles",
        grown as f64 / CYCLES as f64
    );
    assert!(grown < CYCLES * 1024, "{grown} bytes over {CYCLES} cycles");
    bus.shutdown().unwrap();
}

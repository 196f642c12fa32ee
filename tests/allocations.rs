//! Publishing and handling allocate nothing per event once warmed up, with metrics on: the
//! event travels inline, and the worker's histograms exist from its first delivery on.
//!
//! One test in its own binary: the counting allocator sees every thread of the process.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use common::{Numbered, WAIT};
use microbus::{Bus, Context, HandlerResult};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: defers to the system allocator; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const EVENTS: u64 = 20_000;

/// Allocations made while `EVENTS` events are published and handled, after a warm-up.
fn allocations_per_run(metrics: bool) -> u64 {
    // Every delivery timed: the most the recorder does.
    let bus = Bus::builder()
        .workers(2)
        .metrics(metrics)
        .metrics_sample_every(1)
        .build()
        .unwrap();
    bus.subscribe(|_: &Numbered, _: &Context| -> HandlerResult { Ok(()) })
        .unwrap();
    let run = |publisher| {
        for seq in 0..EVENTS {
            bus.publish(Numbered { publisher, seq }).unwrap();
        }
        bus.flush(WAIT).unwrap();
    };
    run(0);
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    run(1);
    let allocations = ALLOCATIONS.load(Ordering::SeqCst) - before;
    let metrics_ok = !metrics || bus.metrics().handlers[0].handler_time.count == 2 * EVENTS;
    assert!(metrics_ok);
    bus.shutdown().unwrap();
    allocations
}

#[test]
fn publishing_and_handling_allocate_nothing_per_event() {
    for metrics in [false, true] {
        let allocations = allocations_per_run(metrics);
        // None per event: a few each time the publisher waits for room in a full shard (about
        // once per channel's worth of events) or flush waits.
        assert!(
            allocations < EVENTS / 100,
            "metrics {metrics}: {allocations} allocations for {EVENTS} events"
        );
    }
}

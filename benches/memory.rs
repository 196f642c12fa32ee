//! Memory: allocations per published event, and bytes per queued event, counted by a global
//! allocator, as a table.
//!
//! Allocations are counted over 100,000 events after a warm-up, publisher and workers
//! together. Bytes per queued event: with the only worker held inside a handler, events are
//! published until the shard is full, and the bytes allocated since the bus was built (its
//! channel's buffer included) are divided by the events queued.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{CAPACITY, Tick};
use microbus::{Bus, Context, HandlerResult};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: defers to the system allocator; only counts calls and bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(
            new_size.saturating_sub(layout.size()) as u64,
            Ordering::Relaxed,
        );
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const EVENTS: u64 = 100_000;
const WAIT: Duration = Duration::from_secs(30);

fn counted(run: impl FnOnce()) -> (u64, u64) {
    let (a, b) = (
        ALLOCATIONS.load(Ordering::SeqCst),
        BYTES.load(Ordering::SeqCst),
    );
    run();
    (
        ALLOCATIONS.load(Ordering::SeqCst) - a,
        BYTES.load(Ordering::SeqCst) - b,
    )
}

/// Allocations per event for `publish` of `EVENTS` events on a bus with `subscriptions`
/// subscriptions.
fn per_event(metrics: bool, subscriptions: usize, publish: impl Fn(&Bus, u64)) -> f64 {
    let bus = Bus::builder().workers(2).metrics(metrics).build().unwrap();
    for _ in 0..subscriptions {
        bus.subscribe(|tick: &Tick, _: &Context| -> HandlerResult {
            black_box(tick);
            Ok(())
        })
        .unwrap();
    }
    publish(&bus, EVENTS);
    bus.flush(WAIT).unwrap();
    let (allocations, _) = counted(|| {
        publish(&bus, EVENTS);
        bus.flush(WAIT).unwrap();
    });
    bus.shutdown().unwrap();
    allocations as f64 / EVENTS as f64
}

fn each(bus: &Bus, n: u64) {
    for i in 0..n {
        bus.publish(Tick(i)).unwrap();
    }
}

fn batches(bus: &Bus, n: u64) {
    let mut i = 0;
    while i < n {
        bus.publish_batch((i..i + 64).map(Tick)).unwrap();
        i += 64;
    }
}

/// Bytes per queued event with the worker held: `publish` queues `events` events.
fn bytes_queued(events: u64, publish: impl Fn(&Bus, u64)) -> f64 {
    let (entered_tx, entered) = crossbeam_channel::bounded(1);
    let (release, release_rx) = crossbeam_channel::bounded::<()>(1);
    let held = Arc::new(AtomicU64::new(0));
    let mut bus = None;
    let (_, bytes) = counted(|| {
        let b = Bus::builder()
            .workers(1)
            .channel_capacity(CAPACITY)
            .metrics(false)
            .build()
            .unwrap();
        let held = held.clone();
        b.subscribe(move |tick: &Tick, _: &Context| -> HandlerResult {
            if held.fetch_add(1, Ordering::SeqCst) == 0 {
                entered_tx.send(()).unwrap();
                release_rx.recv().unwrap();
            }
            black_box(tick);
            Ok(())
        })
        .unwrap();
        b.publish(Tick(u64::MAX)).unwrap();
        entered.recv().unwrap();
        publish(&b, events);
        bus = Some(b);
    });
    let bus = bus.unwrap();
    release.send(()).unwrap();
    bus.flush(WAIT).unwrap();
    bus.shutdown().unwrap();
    bytes as f64 / events as f64
}

fn main() {
    println!("allocations per published event (publisher and workers, after warm-up)");
    let rows: [(&str, f64); 5] = [
        (
            "publish, 1 subscription, metrics off",
            per_event(false, 1, each),
        ),
        (
            "publish, 1 subscription, metrics on",
            per_event(true, 1, each),
        ),
        ("publish, 3 subscriptions", per_event(false, 3, each)),
        (
            "publish_batch of 64, 1 subscription",
            per_event(false, 1, batches),
        ),
        (
            "publish_batch of 64, 3 subscriptions",
            per_event(false, 3, batches),
        ),
    ];
    for (case, value) in rows {
        println!("  {case:<40} {value:>8.4}");
    }
    println!("bytes per queued event (the shard's buffer included), capacity {CAPACITY}");
    let rows: [(&str, f64); 2] = [
        ("publish, queue full", bytes_queued(CAPACITY as u64, each)),
        (
            "publish_batch of 64, queue full",
            bytes_queued(CAPACITY as u64 * 64, batches),
        ),
    ];
    for (case, value) in rows {
        println!("  {case:<40} {value:>8.1}");
    }
}

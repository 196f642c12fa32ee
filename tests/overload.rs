//! Bounded memory under overload: publishers ten times faster than the handler keep the
//! process's live heap flat — bounded by the channel capacity times the bytes of a queued
//! event — and nothing is lost. One test binary: the counting allocator sees every thread.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::live_heap::{LiveBytes, live};
use common::{Numbered, Tally, WAIT};
use microbus::{Bus, Context, HandlerResult};

#[global_allocator]
static GLOBAL: LiveBytes = LiveBytes;

const CAPACITY: usize = 256;
/// How long the overload lasts; `MICROBUS_OVERLOAD_SECS` makes it longer.
fn overload() -> Duration {
    let secs = std::env::var("MICROBUS_OVERLOAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.5);
    Duration::from_secs_f64(secs)
}

/// Work that takes about `micros` microseconds.
fn busy(micros: u64) {
    let until = Instant::now() + Duration::from_micros(micros);
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

#[test]
fn a_flood_keeps_memory_flat_and_loses_nothing() {
    // Every delivery timed, so that the latency histograms grow to their full (bounded) size
    // early in the flood: what is measured after that is the flood itself.
    let bus = Bus::builder()
        .workers(2)
        .channel_capacity(CAPACITY)
        .metrics_sample_every(1)
        .build()
        .unwrap();
    const MAX_EVENTS: usize = 2_000_000;
    let tally = Arc::new(Tally::new(MAX_EVENTS));
    {
        let tally = tally.clone();
        bus.subscribe(move |e: &Numbered, _: &Context| -> HandlerResult {
            busy(20);
            tally.mark(e.seq as usize);
            Ok(())
        })
        .unwrap();
    }
    // Warm up: thread-locals, histograms and the route caches exist before the baseline.
    for seq in 0..1_000 {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    bus.flush(WAIT).unwrap();
    let baseline = live();

    let stop = AtomicBool::new(false);
    let published = AtomicU64::new(1_000);
    let peak = AtomicI64::new(0);
    let mut samples = Vec::new();
    std::thread::scope(|s| {
        for _ in 0..2 {
            let (bus, stop, published) = (&bus, &stop, &published);
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let seq = published.fetch_add(1, Ordering::Relaxed);
                    if seq as usize >= MAX_EVENTS {
                        break;
                    }
                    bus.publish(Numbered { publisher: 0, seq }).unwrap();
                }
            });
        }
        let started = Instant::now();
        while started.elapsed() < overload() {
            std::thread::sleep(Duration::from_millis(10));
            let live = live() - baseline;
            peak.fetch_max(live, Ordering::Relaxed);
            samples.push(live);
        }
        stop.store(true, Ordering::Relaxed);
    });
    let published = published.load(Ordering::SeqCst).min(MAX_EVENTS as u64);
    bus.flush(WAIT).unwrap();
    // The queues were full throughout: each publisher was held back by its shard.
    let handled = published as usize;
    assert!(handled > 10_000, "the flood was too small: {handled}");
    assert_eq!(
        tally
            .not_once()
            .into_iter()
            .filter(|&(i, _)| i < handled)
            .count(),
        0
    );
    // Two shards of CAPACITY slots of at most 256 bytes each, and slack for a publisher's
    // wait registration: the queues are allocated up front, so the flood adds next to nothing.
    let bound = (2 * CAPACITY * 256 + 64 * 1024) as i64;
    let peak = peak.load(Ordering::Relaxed);
    assert!(
        peak < bound,
        "live heap grew by {peak} bytes (bound {bound}): {samples:?}"
    );
    // Flat: the second half of the flood holds no more than the first half's peak (plus slack).
    let half = samples.len() / 2;
    let first = samples[..half].iter().copied().max().unwrap_or(0);
    let second = samples[half..].iter().copied().max().unwrap_or(0);
    assert!(
        second <= first + 16 * 1024,
        "growing: {first} then {second}"
    );
    let report = bus.shutdown().unwrap();
    assert_eq!(report.stats.succeeded, published);
    assert!(report.is_balanced(), "{report}");
}

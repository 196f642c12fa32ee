//! Publish → handle latency at fixed rates, corrected for coordinated omission, as a table.
//!
//! A publisher paces events at 100,000 and 1,000,000 per second; each event carries the time
//! it was due to be published, and the consumer records `handled − due`. Measuring from the due
//! time rather than from when the publisher got round to it keeps a stall from hiding the
//! events queued behind it (coordinated omission). The first tenth of each run is warm-up and
//! not recorded. Percentiles come from an HdrHistogram.
//!
//! Cases: `crossbeam` (a bounded channel, the consumer blocking in `recv`),
//! `crossbeam_spin` (the consumer polling `try_recv` without parking), microbus with the
//! default blocking wait and with `WaitStrategy::SpinThenPark(50 µs)`, metrics off.
//!
//! `cargo bench --bench latency` prints the table; p99 and above mostly measure this virtual
//! machine's stalls.

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::CAPACITY;
use crossbeam_channel::TryRecvError;
use hdrhistogram::Histogram;
use microbus::{Bus, Context, Event, HandlerResult, WaitStrategy};
use serde::{Deserialize, Serialize};

/// An event and the time (raw clock ticks) it was due to be published.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Due {
    seq: u64,
    due: u64,
}

impl Event for Due {
    const NAME: &'static str = "Due";
}

/// Latencies by event, written once each by the consumer.
struct Record {
    clock: quanta::Clock,
    latencies: Vec<AtomicU64>,
    handled: AtomicU64,
}

impl Record {
    fn new(clock: quanta::Clock, events: usize) -> Arc<Record> {
        Arc::new(Record {
            clock,
            latencies: (0..events).map(|_| AtomicU64::new(0)).collect(),
            handled: AtomicU64::new(0),
        })
    }

    fn handle(&self, event: Due) {
        let nanos = self.clock.delta_as_nanos(event.due, self.clock.raw());
        self.latencies[event.seq as usize].store(nanos, Ordering::Relaxed);
        self.handled.fetch_add(1, Ordering::Release);
    }

    fn wait(&self, events: u64) {
        while self.handled.load(Ordering::Acquire) < events {
            std::thread::yield_now();
        }
    }

    fn histogram(&self) -> Histogram<u64> {
        let mut h = Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap();
        let warm_up = self.latencies.len() / 10;
        for latency in &self.latencies[warm_up..] {
            h.saturating_record(latency.load(Ordering::Relaxed).max(1));
        }
        h
    }
}

/// Publishes `events` events at `rate` per second with `publish`, each stamped with its due
/// time.
fn paced(clock: &quanta::Clock, rate: u64, events: u64, mut publish: impl FnMut(Due)) {
    let interval = 1e9 / rate as f64;
    let start = clock.raw();
    let ticks_per_ns = {
        let a = clock.raw();
        std::thread::sleep(Duration::from_millis(2));
        let b = clock.raw();
        (b - a) as f64 / clock.delta_as_nanos(a, b) as f64
    };
    for seq in 0..events {
        let due = start + (seq as f64 * interval * ticks_per_ns) as u64;
        while clock.raw() < due {
            std::hint::spin_loop();
        }
        publish(Due { seq, due });
    }
}

fn crossbeam(clock: &quanta::Clock, rate: u64, events: u64, spin: bool) -> Histogram<u64> {
    let record = Record::new(clock.clone(), events as usize);
    let (tx, rx) = crossbeam_channel::bounded::<Due>(CAPACITY);
    let consumer = {
        let record = record.clone();
        std::thread::spawn(move || {
            if spin {
                loop {
                    match rx.try_recv() {
                        Ok(event) => record.handle(black_box(event)),
                        Err(TryRecvError::Empty) => std::hint::spin_loop(),
                        Err(TryRecvError::Disconnected) => return,
                    }
                }
            } else {
                while let Ok(event) = rx.recv() {
                    record.handle(black_box(event));
                }
            }
        })
    };
    paced(clock, rate, events, |event| tx.send(event).unwrap());
    record.wait(events);
    drop(tx);
    consumer.join().unwrap();
    record.histogram()
}

fn microbus(
    clock: &quanta::Clock,
    rate: u64,
    events: u64,
    strategy: WaitStrategy,
) -> Histogram<u64> {
    let record = Record::new(clock.clone(), events as usize);
    let bus = Bus::builder()
        .workers(1)
        .channel_capacity(CAPACITY)
        .metrics(false)
        .wait_strategy(strategy)
        .build()
        .unwrap();
    {
        let record = record.clone();
        bus.subscribe(move |event: &Due, _: &Context| -> HandlerResult {
            record.handle(black_box(*event));
            Ok(())
        })
        .unwrap();
    }
    paced(clock, rate, events, |event| {
        bus.publish(event).unwrap();
    });
    record.wait(events);
    bus.shutdown().unwrap();
    record.histogram()
}

/// One case's run, giving its latencies.
type Run<'a> = Box<dyn Fn() -> Histogram<u64> + 'a>;

fn micros(nanos: u64) -> String {
    format!("{:.2}", nanos as f64 / 1e3)
}

fn main() {
    let clock = quanta::Clock::new();
    let spin = WaitStrategy::spin_then_park(Duration::from_micros(50));
    println!("publish → handle latency, µs (corrected for coordinated omission)");
    println!(
        "{:<28} {:>10} {:>8} {:>8} {:>8} {:>8} {:>10}",
        "case", "rate/s", "p50", "p90", "p99", "p99.9", "max"
    );
    for (rate, events) in [(100_000u64, 200_000u64), (1_000_000, 1_000_000)] {
        let cases: [(&str, Run<'_>); 4] = [
            (
                "crossbeam",
                Box::new(|| crossbeam(&clock, rate, events, false)),
            ),
            (
                "crossbeam_spin",
                Box::new(|| crossbeam(&clock, rate, events, true)),
            ),
            (
                "microbus_block",
                Box::new(|| microbus(&clock, rate, events, WaitStrategy::Block)),
            ),
            (
                "microbus_spin_then_park",
                Box::new(|| microbus(&clock, rate, events, spin)),
            ),
        ];
        for (name, run) in cases {
            let h = run();
            println!(
                "{:<28} {:>10} {:>8} {:>8} {:>8} {:>8} {:>10}",
                name,
                rate,
                micros(h.value_at_quantile(0.5)),
                micros(h.value_at_quantile(0.9)),
                micros(h.value_at_quantile(0.99)),
                micros(h.value_at_quantile(0.999)),
                micros(h.max()),
            );
        }
    }
}

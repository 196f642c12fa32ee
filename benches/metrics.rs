//! What metrics cost: publish → handle throughput (one producer, one subscription, a trivial
//! handler, 8-byte events, capacity 1024) with metrics off, on for every delivery, and on
//! with latency sampled one delivery in 16, beside the raw crossbeam channel (the floor).

mod common;

use std::hint::black_box;
use std::time::Duration;

use common::{CAPACITY, RawChannel, Tick, counting_bus, timed};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use microbus::Bus;

fn metrics_on_off(c: &mut Criterion) {
    let mut group = c.benchmark_group("metrics_1p1s");
    group.throughput(Throughput::Elements(1));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(4));
    let params = format!("cap{CAPACITY}");

    let raw = RawChannel::new();
    group.bench_function(BenchmarkId::new("crossbeam", &params), |b| {
        b.iter_custom(|iters| raw.run(iters))
    });
    drop(raw);

    for (name, enabled, sample_every) in [
        ("microbus_metrics_off", false, 1),
        ("microbus_metrics_every", true, 1),
        ("microbus_metrics_1in16", true, 16),
    ] {
        let builder = Bus::builder()
            .workers(1)
            .channel_capacity(CAPACITY)
            .metrics(enabled)
            .metrics_sample_every(sample_every);
        let (bus, handled) = counting_bus(builder, 1);
        group.bench_function(BenchmarkId::new(name, &params), |b| {
            b.iter_custom(|iters| {
                timed(iters, &handled, 1, |n| {
                    for i in 0..n {
                        bus.publish(Tick(black_box(i))).unwrap();
                    }
                })
            })
        });
        bus.shutdown().unwrap();
    }
    group.finish();
}

criterion_group!(benches, metrics_on_off);
criterion_main!(benches);

//! The retry timer's data structure: the cost of one schedule plus one fire, with 1,000,
//! 100,000 and 1,000,000 entries pending. Each iteration advances the wheel one tick (firing
//! what is due, one entry on average) and schedules one new entry a random delay ahead, so the
//! number pending stays where it started. A hashed wheel should cost the same per entry
//! whatever that number; a binary heap (the `heap` case, for comparison) grows with its log.
//! Deadlines come from a seeded generator: every run schedules the same ones.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use microbus::internals::{Jitter as Rng, Wheel};

fn schedule_and_fire(c: &mut Criterion) {
    let mut group = c.benchmark_group("retry_wheel_schedule_fire");
    group.throughput(Throughput::Elements(1));
    group.sample_size(20);
    for pending in [1_000u64, 100_000, 1_000_000] {
        group.bench_function(BenchmarkId::new("base", pending), |b| {
            let mut rng = Rng::new(1);
            b.iter(|| black_box(1 + rng.draw() % pending))
        });

        let mut rng = Rng::new(7);
        let mut wheel = Wheel::new(0);
        for id in 0..pending {
            wheel.schedule(1 + rng.draw() % pending, id);
        }
        let mut now = 0u64;
        let mut fired = Vec::new();
        group.bench_function(BenchmarkId::new("wheel", pending), |b| {
            b.iter(|| {
                now += 1;
                wheel.advance(now, &mut fired);
                fired.clear();
                wheel.schedule(now + 1 + rng.draw() % pending, now);
            })
        });
        black_box(wheel.len());

        let mut rng = Rng::new(7);
        let mut heap = BinaryHeap::new();
        for id in 0..pending {
            heap.push(Reverse((1 + rng.draw() % pending, id)));
        }
        let mut now = 0u64;
        group.bench_function(BenchmarkId::new("heap", pending), |b| {
            b.iter(|| {
                now += 1;
                while heap.peek().is_some_and(|Reverse((d, _))| *d <= now) {
                    black_box(heap.pop());
                }
                heap.push(Reverse((now + 1 + rng.draw() % pending, now)));
            })
        });
    }
    group.finish();
}

criterion_group!(benches, schedule_and_fire);
criterion_main!(benches);

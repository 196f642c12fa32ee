//! Publishing from one rayon pool (as many threads as CPUs), over 2 workers, every case run
//! inside `pool.install`: `publish_par_iter` (each task groups its events per shard, through
//! the batch path), `par_iter().for_each(publish)` (one channel operation per event), and a
//! plain loop of `publish` on one of the pool's threads.
//! 8-byte events, a handler that counts, capacity 1024 per channel; a sample ends when every
//! event published in it has been handled.

mod common;

use std::hint::black_box;
use std::time::Duration;

use common::{CAPACITY, Tick, counting_bus, timed};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use microbus::Bus;
use rayon::prelude::*;

/// One way of publishing `n` events on a bus.
type Publisher = fn(&Bus, u64);

fn publish_from_rayon(c: &mut Criterion) {
    let mut g = c.benchmark_group("rayon");
    g.throughput(Throughput::Elements(1));
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(2));
    let cases: [(&str, Publisher); 3] = [
        ("publish_par_iter", |bus, n| {
            bus.publish_par_iter((0..n).into_par_iter().map(|v| Tick(black_box(v))))
                .unwrap();
        }),
        ("par_iter_for_each_publish", |bus, n| {
            (0..n).into_par_iter().for_each(|v| {
                bus.publish(Tick(black_box(v))).unwrap();
            });
        }),
        ("loop_publish_on_the_pool", |bus, n| {
            for v in 0..n {
                bus.publish(Tick(black_box(v))).unwrap();
            }
        }),
    ];
    let pool = rayon::ThreadPoolBuilder::new().build().unwrap();
    for (name, publish) in cases {
        let builder = Bus::builder()
            .workers(2)
            .channel_capacity(CAPACITY)
            .metrics(false);
        let (bus, handled) = counting_bus(builder, 1);
        g.bench_function(BenchmarkId::new(name, "2workers"), |b| {
            b.iter_custom(|iters| timed(iters, &handled, 1, |n| pool.install(|| publish(&bus, n))))
        });
        bus.shutdown().unwrap();
    }
    g.finish();
}

criterion_group!(benches, publish_from_rayon);
criterion_main!(benches);

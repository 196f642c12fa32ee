//! Publish → handle throughput, scenario by scenario, each group with the floor and the peers
//! beside microbus: 8-byte events, a trivial handler that counts, capacity 1024 per channel.
//! A sample ends when every event published in it has been handled.
//!
//! - `1p1s`: one producer, one subscription. `crossbeam`: a bounded channel whose consumer
//!   blocks in `recv` and then drains with `try_recv` (the floor); `std_sync_channel`: the
//!   same with `std::sync::mpsc::sync_channel`; `naive`: a mutex-and-map bus (the obvious
//!   design); `disruptor`: the `disruptor` crate, busy-spinning; microbus with metrics off, on
//!   (sampled one delivery in 16), and with the spin-then-park wait strategy.
//! - `2p1s`: two producers, one subscription.
//! - `fanout`: one producer, 1, 3 and 8 subscriptions (disruptor: 1 and 3 consumers,
//!   multicast).
//! - `keyed`: keyed against unkeyed events over 2 workers, and keyed events to an ordered
//!   subscription (one delivery per key in progress) that never fails.
//! - `workers`: unkeyed events over 1, 2 and 4 workers.
//! - `batch`: events in batches of 64: microbus `publish_batch` to a subscription and to a
//!   batch subscription (blocking, and spinning 50 µs before it parks), disruptor
//!   `batch_publish`, crossbeam carrying 64 events per message;
//!   microbus single publish for reference.
//! - `burst`: bursts of 1, 10 and 100 events, each waited for until the handler has seen its
//!   last event (the time per burst; per event, divide by the burst): crossbeam (a consumer
//!   as in `1p1s`), the disruptor publishing one by one and with `batch_publish`, microbus
//!   `publish` one by one and `publish_batch`, and `publish_batch` to a batch subscription.
//! - `failures`: microbus with 1% of deliveries failing once (retried) against none.
//! - `lanes`: fan-out to 3 subscriptions on one lane of 3 workers against 3 lanes of 1 worker
//!   (deliveries/s); and the head-of-line case: a fast subscription while another service
//!   keeps a slow one (20 µs a delivery) busy, the fast one's throughput with both on the bus's
//!   2 workers and with the slow one on a lane of its own.

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{
    CAPACITY, NaiveBus, RawChannel, StdChannel, Tick, counting_bus, counting_bus_with, timed,
    wait_for,
};
use criterion::measurement::WallTime;
use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main,
};
use disruptor::{BusySpin, Producer};
use microbus::{
    Batch, Bus, BusBuilder, Context, HandlerError, HandlerResult, Lane, Publish, RetryPolicy,
    SubscribeOptions, WaitStrategy,
};

const BATCH: u64 = 64;

fn group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(1));
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    group
}

fn builder(workers: usize) -> BusBuilder {
    Bus::builder()
        .workers(workers)
        .channel_capacity(CAPACITY)
        .metrics(false)
}

fn bench_bus(
    group: &mut BenchmarkGroup<'_, WallTime>,
    id: BenchmarkId,
    builder: BusBuilder,
    subscriptions: usize,
    publish: impl Fn(&Bus, u64),
) {
    let (bus, handled) = counting_bus(builder, subscriptions);
    group.bench_function(id, |b| {
        b.iter_custom(|iters| timed(iters, &handled, subscriptions as u64, |n| publish(&bus, n)))
    });
    bus.shutdown().unwrap();
}

fn publish_each(bus: &Bus, n: u64) {
    for i in 0..n {
        bus.publish(Tick(black_box(i))).unwrap();
    }
}

fn bench_naive(
    group: &mut BenchmarkGroup<'_, WallTime>,
    id: BenchmarkId,
    workers: usize,
    subscriptions: usize,
) {
    let naive = NaiveBus::new(workers);
    let handled = Arc::new(AtomicU64::new(0));
    for _ in 0..subscriptions {
        let handled = handled.clone();
        naive.subscribe(move |tick: &Tick| {
            black_box(tick);
            handled.fetch_add(1, Ordering::Release);
        });
    }
    group.bench_function(id, |b| {
        b.iter_custom(|iters| {
            timed(iters, &handled, subscriptions as u64, |n| {
                for i in 0..n {
                    naive.publish(Tick(black_box(i)));
                }
            })
        })
    });
}

/// A disruptor slot: the event.
#[derive(Default)]
struct Slot(u64);

fn counter(handled: &Arc<AtomicU64>) -> impl FnMut(&Slot, i64, bool) + Send + 'static {
    let handled = handled.clone();
    move |slot: &Slot, _, _| {
        black_box(slot.0);
        handled.fetch_add(1, Ordering::Release);
    }
}

fn disruptor_1p(group: &mut BenchmarkGroup<'_, WallTime>, id: BenchmarkId, consumers: usize) {
    let handled = Arc::new(AtomicU64::new(0));
    let builder = disruptor::build_single_producer(CAPACITY, Slot::default, BusySpin);
    let mut run = |producer: &mut dyn FnMut(u64)| {
        group.bench_function(id.clone(), |b| {
            b.iter_custom(|iters| timed(iters, &handled, consumers as u64, &mut *producer))
        });
    };
    match consumers {
        1 => {
            let mut p = builder.handle_events_with(counter(&handled)).build();
            run(&mut |n| {
                for i in 0..n {
                    p.publish(|slot| slot.0 = black_box(i));
                }
            });
        }
        3 => {
            let mut p = builder
                .handle_events_with(counter(&handled))
                .handle_events_with(counter(&handled))
                .handle_events_with(counter(&handled))
                .build();
            run(&mut |n| {
                for i in 0..n {
                    p.publish(|slot| slot.0 = black_box(i));
                }
            });
        }
        _ => unreachable!("1 or 3 consumers"),
    }
}

fn one_to_one(c: &mut Criterion) {
    let mut g = group(c, "1p1s");
    let params = format!("cap{CAPACITY}");
    let raw = RawChannel::new();
    g.bench_function(BenchmarkId::new("crossbeam", &params), |b| {
        b.iter_custom(|iters| raw.run(iters))
    });
    drop(raw);
    let std = StdChannel::new();
    g.bench_function(BenchmarkId::new("std_sync_channel", &params), |b| {
        b.iter_custom(|iters| std.run(iters))
    });
    drop(std);
    bench_naive(&mut g, BenchmarkId::new("naive", &params), 1, 1);
    disruptor_1p(&mut g, BenchmarkId::new("disruptor", &params), 1);
    bench_bus(
        &mut g,
        BenchmarkId::new("microbus", &params),
        builder(1),
        1,
        publish_each,
    );
    // The configuration a bus gets with no settings but these: metrics on, sampled.
    bench_bus(
        &mut g,
        BenchmarkId::new("microbus_default", &params),
        Bus::builder().workers(1).channel_capacity(CAPACITY),
        1,
        publish_each,
    );
    bench_bus(
        &mut g,
        BenchmarkId::new("microbus_metrics_1in16", &params),
        builder(1).metrics(true).metrics_sample_every(16),
        1,
        publish_each,
    );
    bench_bus(
        &mut g,
        BenchmarkId::new("microbus_spin", &params),
        builder(1).wait_strategy(WaitStrategy::spin_then_park(Duration::from_micros(50))),
        1,
        publish_each,
    );
    g.finish();
}

fn two_to_one(c: &mut Criterion) {
    let mut g = group(c, "2p1s");
    let params = format!("cap{CAPACITY}");
    // Each iteration publishes two events, one from each producer thread.
    g.throughput(Throughput::Elements(2));
    let (tx, rx) = crossbeam_channel::bounded::<u64>(CAPACITY);
    let handled = Arc::new(AtomicU64::new(0));
    let consumer = {
        let handled = handled.clone();
        std::thread::spawn(move || {
            while let Ok(v) = rx.recv() {
                black_box(v);
                handled.fetch_add(1, Ordering::Release);
            }
        })
    };
    g.bench_function(BenchmarkId::new("crossbeam", &params), |b| {
        b.iter_custom(|iters| {
            timed(iters, &handled, 2, |n| {
                std::thread::scope(|s| {
                    for _ in 0..2 {
                        let tx = tx.clone();
                        s.spawn(move || {
                            for i in 0..n {
                                tx.send(black_box(i)).unwrap();
                            }
                        });
                    }
                });
            })
        })
    });
    drop(tx);
    consumer.join().unwrap();

    let naive = NaiveBus::new(1);
    let handled = Arc::new(AtomicU64::new(0));
    {
        let handled = handled.clone();
        naive.subscribe(move |tick: &Tick| {
            black_box(tick);
            handled.fetch_add(1, Ordering::Release);
        });
    }
    g.bench_function(BenchmarkId::new("naive", &params), |b| {
        b.iter_custom(|iters| {
            timed(iters, &handled, 2, |n| {
                std::thread::scope(|s| {
                    for _ in 0..2 {
                        let naive = &naive;
                        s.spawn(move || {
                            for i in 0..n {
                                naive.publish(Tick(black_box(i)));
                            }
                        });
                    }
                });
            })
        })
    });
    drop(naive);

    let handled = Arc::new(AtomicU64::new(0));
    let producer = disruptor::build_multi_producer(CAPACITY, Slot::default, BusySpin)
        .handle_events_with(counter(&handled))
        .build();
    g.bench_function(BenchmarkId::new("disruptor", &params), |b| {
        b.iter_custom(|iters| {
            timed(iters, &handled, 2, |n| {
                std::thread::scope(|s| {
                    for _ in 0..2 {
                        let mut producer = producer.clone();
                        s.spawn(move || {
                            for i in 0..n {
                                producer.publish(|slot| slot.0 = black_box(i));
                            }
                        });
                    }
                });
            })
        })
    });
    drop(producer);

    bench_bus(
        &mut g,
        BenchmarkId::new("microbus", &params),
        builder(1),
        1,
        |bus, n| {
            std::thread::scope(|s| {
                for _ in 0..2 {
                    s.spawn(move || publish_each(bus, n));
                }
            });
        },
    );
    g.finish();
}

fn fan_out(c: &mut Criterion) {
    let mut g = group(c, "fanout");
    for subscriptions in [1usize, 3, 8] {
        let params = format!("{subscriptions}subs");
        // One element per delivery: the cost per event is `subscriptions` times the time.
        g.throughput(Throughput::Elements(subscriptions as u64));
        bench_naive(&mut g, BenchmarkId::new("naive", &params), 1, subscriptions);
        if subscriptions <= 3 {
            disruptor_1p(
                &mut g,
                BenchmarkId::new("disruptor", &params),
                subscriptions,
            );
        }
        bench_bus(
            &mut g,
            BenchmarkId::new("microbus", &params),
            builder(1),
            subscriptions,
            publish_each,
        );
    }
    g.finish();
}

fn keyed(c: &mut Criterion) {
    let mut g = group(c, "keyed");
    bench_naive(&mut g, BenchmarkId::new("naive", "2workers"), 2, 1);
    bench_bus(
        &mut g,
        BenchmarkId::new("microbus_unkeyed", "2workers"),
        builder(2),
        1,
        publish_each,
    );
    let keyed = |bus: &Bus, n: u64| {
        for i in 0..n {
            bus.publish_with(Tick(black_box(i)), Publish::keyed(i % 64))
                .unwrap();
        }
    };
    bench_bus(
        &mut g,
        BenchmarkId::new("microbus_keyed", "2workers"),
        builder(2),
        1,
        keyed,
    );
    // The same, to an ordered subscription that never fails.
    let (bus, handled) = counting_bus_with(builder(2), SubscribeOptions::new().ordered());
    g.bench_function(
        BenchmarkId::new("microbus_keyed_ordered", "2workers"),
        |b| b.iter_custom(|iters| timed(iters, &handled, 1, |n| keyed(&bus, n))),
    );
    bus.shutdown().unwrap();
    g.finish();
}

fn workers(c: &mut Criterion) {
    let mut g = group(c, "workers");
    for workers in [1usize, 2, 4] {
        let params = format!("{workers}workers");
        bench_naive(&mut g, BenchmarkId::new("naive", &params), workers, 1);
        bench_bus(
            &mut g,
            BenchmarkId::new("microbus", &params),
            builder(workers),
            1,
            publish_each,
        );
    }
    g.finish();
}

fn batch(c: &mut Criterion) {
    let mut g = group(c, "batch");
    let params = format!("batch{BATCH}");

    let (tx, rx) = crossbeam_channel::bounded::<Vec<u64>>(CAPACITY);
    let handled = Arc::new(AtomicU64::new(0));
    let consumer = {
        let handled = handled.clone();
        std::thread::spawn(move || {
            while let Ok(batch) = rx.recv() {
                for v in batch {
                    black_box(v);
                    handled.fetch_add(1, Ordering::Release);
                }
            }
        })
    };
    g.bench_function(BenchmarkId::new("crossbeam_vec", &params), |b| {
        b.iter_custom(|iters| {
            timed(iters, &handled, 1, |n| {
                let mut i = 0;
                while i < n {
                    let end = (i + BATCH).min(n);
                    tx.send((i..end).map(black_box).collect()).unwrap();
                    i = end;
                }
            })
        })
    });
    drop(tx);
    consumer.join().unwrap();

    let handled = Arc::new(AtomicU64::new(0));
    let mut producer = disruptor::build_single_producer(CAPACITY, Slot::default, BusySpin)
        .handle_events_with(counter(&handled))
        .build();
    g.bench_function(BenchmarkId::new("disruptor_batch_publish", &params), |b| {
        b.iter_custom(|iters| {
            timed(iters, &handled, 1, |n| {
                let mut i = 0;
                while i < n {
                    let len = BATCH.min(n - i);
                    producer.batch_publish(len as usize, |slots| {
                        for slot in slots {
                            slot.0 = black_box(i);
                            i += 1;
                        }
                    });
                }
            })
        })
    });
    drop(producer);

    bench_bus(
        &mut g,
        BenchmarkId::new("microbus_publish_batch", &params),
        builder(1),
        1,
        |bus, n| {
            let mut i = 0;
            while i < n {
                let end = (i + BATCH).min(n);
                bus.publish_batch((i..end).map(|v| Tick(black_box(v))))
                    .unwrap();
                i = end;
            }
        },
    );
    for (name, builder) in [
        ("microbus_batch_subscription", builder(1)),
        // The worker polls a while before it parks, as the disruptor's consumer spins.
        (
            "microbus_batch_subscription_spin",
            builder(1).wait_strategy(WaitStrategy::spin_then_park(Duration::from_micros(50))),
        ),
    ] {
        let (bus, handled) = batch_counting_bus(builder);
        g.bench_function(BenchmarkId::new(name, &params), |b| {
            b.iter_custom(|iters| timed(iters, &handled, 1, |n| publish_in_batches(&bus, 0, n)))
        });
        bus.shutdown().unwrap();
    }
    bench_bus(
        &mut g,
        BenchmarkId::new("microbus_publish", "single"),
        builder(1),
        1,
        publish_each,
    );
    g.finish();
}

/// A bus whose one batch subscription counts the events it gets.
fn batch_counting_bus(builder: BusBuilder) -> (Bus, Arc<AtomicU64>) {
    let bus = builder.build().unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    let counter = handled.clone();
    bus.subscribe_batch(move |batch: &Batch<Tick>, _: &Context| -> HandlerResult {
        for tick in batch.events() {
            black_box(tick);
        }
        counter.fetch_add(batch.len() as u64, Ordering::Release);
        Ok(())
    })
    .unwrap();
    (bus, handled)
}

fn publish_in_batches(bus: &Bus, first: u64, n: u64) {
    let mut i = first;
    while i < first + n {
        let end = (i + BATCH).min(first + n);
        bus.publish_batch((i..end).map(|v| Tick(black_box(v))))
            .unwrap();
        i = end;
    }
}

/// Runs `iters` bursts of `burst` events: `publish(first, burst)` sends one, then the run waits
/// until `handled` has counted its last event.
fn in_bursts(
    iters: u64,
    burst: u64,
    handled: &AtomicU64,
    mut publish: impl FnMut(u64, u64),
) -> Duration {
    let mut target = handled.load(Ordering::Acquire);
    let start = Instant::now();
    for i in 0..iters {
        target += burst;
        publish(i * burst, burst);
        wait_for(handled, target);
    }
    start.elapsed()
}

fn burst(c: &mut Criterion) {
    let mut g = group(c, "burst");
    for burst in [1u64, 10, 100] {
        g.throughput(Throughput::Elements(burst));
        let params = format!("burst{burst}");

        let (tx, rx) = crossbeam_channel::bounded::<u64>(CAPACITY);
        let handled = Arc::new(AtomicU64::new(0));
        let consumer = {
            let handled = handled.clone();
            std::thread::spawn(move || {
                while let Ok(v) = rx.recv() {
                    black_box(v);
                    handled.fetch_add(1, Ordering::Release);
                    while let Ok(v) = rx.try_recv() {
                        black_box(v);
                        handled.fetch_add(1, Ordering::Release);
                    }
                }
            })
        };
        g.bench_function(BenchmarkId::new("crossbeam", &params), |b| {
            b.iter_custom(|iters| {
                in_bursts(iters, burst, &handled, |first, n| {
                    for i in first..first + n {
                        tx.send(black_box(i)).unwrap();
                    }
                })
            })
        });
        drop(tx);
        consumer.join().unwrap();

        let handled = Arc::new(AtomicU64::new(0));
        let mut producer = disruptor::build_single_producer(CAPACITY, Slot::default, BusySpin)
            .handle_events_with(counter(&handled))
            .build();
        g.bench_function(BenchmarkId::new("disruptor", &params), |b| {
            b.iter_custom(|iters| {
                in_bursts(iters, burst, &handled, |first, n| {
                    for i in first..first + n {
                        producer.publish(|slot| slot.0 = black_box(i));
                    }
                })
            })
        });
        g.bench_function(BenchmarkId::new("disruptor_batch_publish", &params), |b| {
            b.iter_custom(|iters| {
                in_bursts(iters, burst, &handled, |first, n| {
                    let mut i = first;
                    producer.batch_publish(n as usize, |slots| {
                        for slot in slots {
                            slot.0 = black_box(i);
                            i += 1;
                        }
                    });
                })
            })
        });
        drop(producer);

        let (bus, handled) = counting_bus(builder(1), 1);
        g.bench_function(BenchmarkId::new("microbus_publish", &params), |b| {
            b.iter_custom(|iters| {
                in_bursts(iters, burst, &handled, |first, n| {
                    for i in first..first + n {
                        bus.publish(Tick(black_box(i))).unwrap();
                    }
                })
            })
        });
        g.bench_function(BenchmarkId::new("microbus_publish_batch", &params), |b| {
            b.iter_custom(|iters| {
                in_bursts(iters, burst, &handled, |first, n| {
                    bus.publish_batch((first..first + n).map(|i| Tick(black_box(i))))
                        .unwrap();
                })
            })
        });
        bus.shutdown().unwrap();
        let (bus, handled) = batch_counting_bus(builder(1));
        g.bench_function(
            BenchmarkId::new("microbus_batch_subscription", &params),
            |b| {
                b.iter_custom(|iters| {
                    in_bursts(iters, burst, &handled, |first, n| {
                        publish_in_batches(&bus, first, n)
                    })
                })
            },
        );
        bus.shutdown().unwrap();
    }
    g.finish();
}

/// The same flow with deliveries failing once and retried, against none failing.
fn failures(c: &mut Criterion) {
    let mut g = group(c, "failures");
    for percent in [0u64, 1] {
        let bus = builder(1)
            .retry(RetryPolicy::fixed(Duration::ZERO).max_attempts(2))
            .build()
            .unwrap();
        let handled = Arc::new(AtomicU64::new(0));
        {
            let handled = handled.clone();
            bus.subscribe(move |tick: &Tick, ctx: &Context| -> HandlerResult {
                if ctx.attempt() == 1 && tick.0 % 100 < percent {
                    return Err(HandlerError::msg("once"));
                }
                handled.fetch_add(1, Ordering::Release);
                Ok(())
            })
            .unwrap();
        }
        g.bench_function(
            BenchmarkId::new("microbus", format!("{percent}pct_fail_once")),
            |b| b.iter_custom(|iters| timed(iters, &handled, 1, |n| publish_each(&bus, n))),
        );
        bus.shutdown().unwrap();
    }
    g.finish();
}

/// A job that takes a slow subscription 20 µs.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SlowJob(u64);

impl microbus::Event for SlowJob {
    const NAME: &'static str = "SlowJob";
}

fn lanes(c: &mut Criterion) {
    let mut g = group(c, "lanes");
    let params = format!("cap{CAPACITY}");
    g.throughput(Throughput::Elements(3));
    for (id, lanes) in [("fanout3_one_lane", false), ("fanout3_three_lanes", true)] {
        let mut builder = builder(if lanes { 1 } else { 3 });
        if lanes {
            builder = builder
                .lane("b", Lane::new(1).channel_capacity(CAPACITY))
                .lane("c", Lane::new(1).channel_capacity(CAPACITY));
        }
        let bus = builder.build().unwrap();
        let handled = Arc::new(AtomicU64::new(0));
        for lane in [None, Some("b"), Some("c")] {
            let handled = handled.clone();
            let options = match (lanes, lane) {
                (true, Some(lane)) => SubscribeOptions::new().lane(lane),
                _ => SubscribeOptions::new(),
            };
            bus.subscribe_with(options, move |tick: &Tick, _: &Context| -> HandlerResult {
                black_box(tick);
                handled.fetch_add(1, Ordering::Release);
                Ok(())
            })
            .unwrap();
        }
        g.bench_function(BenchmarkId::new(id, &params), |b| {
            b.iter_custom(|iters| timed(iters, &handled, 3, |n| publish_each(&bus, n)))
        });
        bus.shutdown().unwrap();
    }
    g.throughput(Throughput::Elements(1));
    for (id, own_lane) in [
        ("fast_beside_slow_one_lane", false),
        ("fast_beside_slow_own_lane", true),
    ] {
        let mut builder = builder(2);
        if own_lane {
            builder = builder.lane("slow", Lane::new(1).channel_capacity(CAPACITY));
        }
        let bus = builder.build().unwrap();
        let fast = Arc::new(AtomicU64::new(0));
        let counter = fast.clone();
        bus.subscribe(move |tick: &Tick, _: &Context| -> HandlerResult {
            black_box(tick);
            counter.fetch_add(1, Ordering::Release);
            Ok(())
        })
        .unwrap();
        let slow = if own_lane {
            SubscribeOptions::new().lane("slow")
        } else {
            SubscribeOptions::new()
        };
        bus.subscribe_with(slow, |job: &SlowJob, _: &Context| -> HandlerResult {
            let until = std::time::Instant::now() + Duration::from_micros(20);
            while std::time::Instant::now() < until {
                black_box(job);
            }
            Ok(())
        })
        .unwrap();
        // Another service keeps the slow subscription busy all along.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let feeder = {
            let (bus, stop) = (bus.service("reports").unwrap(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    if bus
                        .publish_timeout(SlowJob(i), Duration::from_millis(10))
                        .is_ok()
                    {
                        i += 1;
                    }
                }
            })
        };
        g.bench_function(BenchmarkId::new(id, &params), |b| {
            b.iter_custom(|iters| timed(iters, &fast, 1, |n| publish_each(&bus, n)))
        });
        stop.store(true, Ordering::Relaxed);
        feeder.join().unwrap();
        bus.shutdown_timeout(Duration::from_secs(60)).unwrap();
    }
    g.finish();
}

criterion_group!(
    benches, one_to_one, two_to_one, fan_out, keyed, workers, batch, burst, failures, lanes
);
criterion_main!(benches);

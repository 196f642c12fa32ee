//! Publish → handle throughput: one producer, one subscription, a trivial handler, 8-byte
//! events, channel capacity 1024.
//!
//! Side by side in one group: `base` (the harness alone), `crossbeam` (a raw bounded channel
//! whose consumer blocks in `recv` and then drains with `try_recv`: the floor), `naive` (a
//! mutex-and-map bus: the obvious design) and `microbus`. Each iteration publishes one event;
//! a sample ends when the consumer has handled everything published in it.
//!
//! A second group, `publish_handle_failures`, runs microbus with 1% of deliveries failing once
//! (retried at the next timer tick) against none failing.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use crossbeam_channel::Sender;
use microbus::{Bus, Context, HandlerError, HandlerResult, RetryPolicy};

mod common;

use common::{CAPACITY, RawChannel, Tick, wait_for};

type NaiveHandler = Arc<dyn Fn(&dyn Any) + Send + Sync>;

/// The obvious design: one mutex-protected map of handlers, locked on every publish and every
/// dispatch, boxed events through one channel to two workers.
struct NaiveBus {
    handlers: Arc<Mutex<HashMap<TypeId, Vec<NaiveHandler>>>>,
    tx: Option<Sender<(TypeId, Box<dyn Any + Send>)>>,
    workers: Vec<JoinHandle<()>>,
}

impl NaiveBus {
    fn new(workers: usize) -> NaiveBus {
        let handlers: Arc<Mutex<HashMap<TypeId, Vec<NaiveHandler>>>> = Arc::default();
        let (tx, rx) = crossbeam_channel::bounded::<(TypeId, Box<dyn Any + Send>)>(CAPACITY);
        let workers = (0..workers)
            .map(|_| {
                let (handlers, rx) = (handlers.clone(), rx.clone());
                std::thread::spawn(move || {
                    while let Ok((type_id, event)) = rx.recv() {
                        let map = handlers.lock().unwrap();
                        if let Some(list) = map.get(&type_id) {
                            for handler in list {
                                handler(&*event);
                            }
                        }
                    }
                })
            })
            .collect();
        NaiveBus {
            handlers,
            tx: Some(tx),
            workers,
        }
    }

    fn subscribe<E: Any>(&self, handler: impl Fn(&E) + Send + Sync + 'static) {
        let erased: NaiveHandler = Arc::new(move |event: &dyn Any| {
            if let Some(event) = event.downcast_ref::<E>() {
                handler(event);
            }
        });
        self.handlers
            .lock()
            .unwrap()
            .entry(TypeId::of::<E>())
            .or_default()
            .push(erased);
    }

    fn publish<E: Any + Send>(&self, event: E) {
        let has_handlers = self
            .handlers
            .lock()
            .unwrap()
            .get(&TypeId::of::<E>())
            .is_some_and(|l| !l.is_empty());
        if has_handlers {
            self.tx
                .as_ref()
                .unwrap()
                .send((TypeId::of::<E>(), Box::new(event)))
                .unwrap();
        }
    }
}

impl Drop for NaiveBus {
    fn drop(&mut self) {
        drop(self.tx.take());
        for worker in self.workers.drain(..) {
            worker.join().unwrap();
        }
    }
}

fn publish_handle(c: &mut Criterion) {
    let mut group = c.benchmark_group("publish_handle_1p1s");
    group.throughput(Throughput::Elements(1));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(4));
    let params = format!("cap{CAPACITY}");

    group.bench_function(BenchmarkId::new("base", &params), |b| {
        b.iter(|| black_box(Tick(black_box(1))))
    });

    let raw = RawChannel::new();
    group.bench_function(BenchmarkId::new("crossbeam", &params), |b| {
        b.iter_custom(|iters| raw.run(iters))
    });
    drop(raw);

    let naive = NaiveBus::new(2);
    let naive_handled = Arc::new(AtomicU64::new(0));
    {
        let handled = naive_handled.clone();
        naive.subscribe(move |tick: &Tick| {
            black_box(tick);
            handled.fetch_add(1, Ordering::Release);
        });
    }
    group.bench_function(BenchmarkId::new("naive", &params), |b| {
        b.iter_custom(|iters| {
            let target = naive_handled.load(Ordering::Acquire) + iters;
            let start = Instant::now();
            for i in 0..iters {
                naive.publish(Tick(black_box(i)));
            }
            wait_for(&naive_handled, target);
            start.elapsed()
        })
    });
    drop(naive);

    let bus = Bus::builder()
        .workers(1)
        .channel_capacity(CAPACITY)
        .build()
        .unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    {
        let handled = handled.clone();
        bus.subscribe(move |tick: &Tick, _: &Context| -> HandlerResult {
            black_box(tick);
            handled.fetch_add(1, Ordering::Release);
            Ok(())
        })
        .unwrap();
    }
    group.bench_function(BenchmarkId::new("microbus", &params), |b| {
        b.iter_custom(|iters| {
            let target = handled.load(Ordering::Acquire) + iters;
            let start = Instant::now();
            for i in 0..iters {
                bus.publish(Tick(black_box(i))).unwrap();
            }
            wait_for(&handled, target);
            start.elapsed()
        })
    });
    group.finish();
    bus.shutdown().unwrap();
}

/// The same flow with deliveries failing once and retried, against none failing.
fn with_failures(c: &mut Criterion) {
    let mut group = c.benchmark_group("publish_handle_failures");
    group.throughput(Throughput::Elements(1));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(4));
    for percent in [0u64, 1] {
        let bus = Bus::builder()
            .workers(1)
            .channel_capacity(CAPACITY)
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
        group.bench_function(
            BenchmarkId::new("microbus", format!("{percent}pct_fail_once")),
            |b| {
                b.iter_custom(|iters| {
                    let target = handled.load(Ordering::Acquire) + iters;
                    let start = Instant::now();
                    for i in 0..iters {
                        bus.publish(Tick(black_box(i))).unwrap();
                    }
                    wait_for(&handled, target);
                    start.elapsed()
                })
            },
        );
        bus.shutdown().unwrap();
    }
    group.finish();
}

criterion_group!(benches, publish_handle, with_failures);
criterion_main!(benches);

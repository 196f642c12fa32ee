//! What the benches share: the event, the floor (a raw crossbeam channel), the std channel,
//! the naive bus and a waiting helper.

#![allow(dead_code)] // Each bench uses a part.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use microbus::{Bus, BusBuilder, Context, Event, HandlerResult, SubscribeOptions};
use serde::{Deserialize, Serialize};

pub const CAPACITY: usize = 1024;

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Tick(pub u64);

impl Event for Tick {
    const NAME: &'static str = "Tick";
}

/// Waits until `counter` reaches `target`.
pub fn wait_for(counter: &AtomicU64, target: u64) {
    let mut spins = 0u32;
    while counter.load(Ordering::Acquire) < target {
        spins += 1;
        if spins < 64 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// One end of a channel of `u64`s, as a [`Floor`] uses it.
pub trait Channel: Send + 'static {
    type Tx;
    type Rx: Send + 'static;
    fn bounded(capacity: usize) -> (Self::Tx, Self::Rx);
    fn send(tx: &Self::Tx, value: u64);
    /// Blocks for a value; `None` once the sender is gone.
    fn recv(rx: &Self::Rx) -> Option<u64>;
    /// A value if one is there.
    fn try_recv(rx: &Self::Rx) -> Option<u64>;
}

/// A bounded channel of `u64`s whose consumer blocks for one value, then drains the rest
/// without blocking, counting each: the floor the benches compare with.
pub struct Floor<C: Channel> {
    tx: Option<C::Tx>,
    handled: Arc<AtomicU64>,
    consumer: Option<JoinHandle<()>>,
}

impl<C: Channel> Floor<C> {
    pub fn new() -> Floor<C> {
        let (tx, rx) = C::bounded(CAPACITY);
        let handled = Arc::new(AtomicU64::new(0));
        let consumer = {
            let handled = handled.clone();
            std::thread::spawn(move || {
                while let Some(v) = C::recv(&rx) {
                    black_box(v);
                    handled.fetch_add(1, Ordering::Release);
                    while let Some(v) = C::try_recv(&rx) {
                        black_box(v);
                        handled.fetch_add(1, Ordering::Release);
                    }
                }
            })
        };
        Floor {
            tx: Some(tx),
            handled,
            consumer: Some(consumer),
        }
    }

    /// Sends `iters` values and waits until the consumer has counted them all.
    pub fn run(&self, iters: u64) -> Duration {
        let tx = self.tx.as_ref().unwrap();
        let target = self.handled.load(Ordering::Acquire) + iters;
        let start = Instant::now();
        for i in 0..iters {
            C::send(tx, black_box(i));
        }
        wait_for(&self.handled, target);
        start.elapsed()
    }
}

impl<C: Channel> Drop for Floor<C> {
    fn drop(&mut self) {
        drop(self.tx.take());
        self.consumer.take().unwrap().join().unwrap();
    }
}

/// crossbeam's bounded channel.
pub struct Crossbeam;

impl Channel for Crossbeam {
    type Tx = Sender<u64>;
    type Rx = Receiver<u64>;
    fn bounded(capacity: usize) -> (Sender<u64>, Receiver<u64>) {
        crossbeam_channel::bounded(capacity)
    }
    fn send(tx: &Sender<u64>, value: u64) {
        tx.send(value).unwrap();
    }
    fn recv(rx: &Receiver<u64>) -> Option<u64> {
        rx.recv().ok()
    }
    fn try_recv(rx: &Receiver<u64>) -> Option<u64> {
        rx.try_recv().ok()
    }
}

/// `std::sync::mpsc::sync_channel`.
pub struct StdSync;

impl Channel for StdSync {
    type Tx = std::sync::mpsc::SyncSender<u64>;
    type Rx = std::sync::mpsc::Receiver<u64>;
    fn bounded(capacity: usize) -> (Self::Tx, Self::Rx) {
        std::sync::mpsc::sync_channel(capacity)
    }
    fn send(tx: &Self::Tx, value: u64) {
        tx.send(value).unwrap();
    }
    fn recv(rx: &Self::Rx) -> Option<u64> {
        rx.recv().ok()
    }
    fn try_recv(rx: &Self::Rx) -> Option<u64> {
        rx.try_recv().ok()
    }
}

/// The floor: crossbeam's bounded channel.
pub type RawChannel = Floor<Crossbeam>;
/// The same with the standard library's `sync_channel`.
pub type StdChannel = Floor<StdSync>;

type NaiveHandler = Arc<dyn Fn(&dyn Any) + Send + Sync>;

/// The obvious design: one mutex-protected map of handlers, locked on every publish and every
/// dispatch, boxed events through one channel to its workers.
pub struct NaiveBus {
    handlers: Arc<Mutex<HashMap<TypeId, Vec<NaiveHandler>>>>,
    tx: Option<Sender<(TypeId, Box<dyn Any + Send>)>>,
    workers: Vec<JoinHandle<()>>,
}

impl NaiveBus {
    pub fn new(workers: usize) -> NaiveBus {
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

    pub fn subscribe<E: Any>(&self, handler: impl Fn(&E) + Send + Sync + 'static) {
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

    pub fn publish<E: Any + Send>(&self, event: E) {
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

/// A bus with `subscriptions` counting subscriptions of `Tick`, and their shared count.
pub fn counting_bus(builder: BusBuilder, subscriptions: usize) -> (Bus, Arc<AtomicU64>) {
    let bus = builder.build().unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    for _ in 0..subscriptions {
        subscribe_counting(&bus, &handled, SubscribeOptions::new());
    }
    (bus, handled)
}

/// A bus with one counting subscription made with `options`.
#[allow(dead_code)]
pub fn counting_bus_with(builder: BusBuilder, options: SubscribeOptions) -> (Bus, Arc<AtomicU64>) {
    let bus = builder.build().unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    subscribe_counting(&bus, &handled, options);
    (bus, handled)
}

fn subscribe_counting(bus: &Bus, handled: &Arc<AtomicU64>, options: SubscribeOptions) {
    let handled = handled.clone();
    bus.subscribe_with(options, move |tick: &Tick, _: &Context| -> HandlerResult {
        black_box(tick);
        handled.fetch_add(1, Ordering::Release);
        Ok(())
    })
    .unwrap();
}

/// Times `publish` of `iters` events until `handled` has grown by `per_event` per event.
pub fn timed(
    iters: u64,
    handled: &AtomicU64,
    per_event: u64,
    publish: impl FnOnce(u64),
) -> Duration {
    let target = handled.load(Ordering::Acquire) + iters * per_event;
    let start = Instant::now();
    publish(iters);
    wait_for(handled, target);
    start.elapsed()
}

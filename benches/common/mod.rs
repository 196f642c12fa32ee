//! What the benches share: the event, the floor (a raw crossbeam channel) and a waiting
//! helper.

#![allow(dead_code)] // Each bench uses a part.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use microbus::Event;
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

/// The floor: a bounded crossbeam channel and a consumer that blocks, then drains.
pub struct RawChannel {
    tx: Option<Sender<u64>>,
    handled: Arc<AtomicU64>,
    consumer: Option<JoinHandle<()>>,
}

impl RawChannel {
    pub fn new() -> RawChannel {
        let (tx, rx): (Sender<u64>, Receiver<u64>) = crossbeam_channel::bounded(CAPACITY);
        let handled = Arc::new(AtomicU64::new(0));
        let consumer = {
            let handled = handled.clone();
            std::thread::spawn(move || {
                while let Ok(v) = rx.recv() {
                    black_box(v);
                    handled.fetch_add(1, Ordering::Release);
                    loop {
                        match rx.try_recv() {
                            Ok(v) => {
                                black_box(v);
                                handled.fetch_add(1, Ordering::Release);
                            }
                            Err(TryRecvError::Empty) => break,
                            Err(TryRecvError::Disconnected) => return,
                        }
                    }
                }
            })
        };
        RawChannel {
            tx: Some(tx),
            handled,
            consumer: Some(consumer),
        }
    }

    pub fn run(&self, iters: u64) -> Duration {
        let tx = self.tx.as_ref().unwrap();
        let target = self.handled.load(Ordering::Acquire) + iters;
        let start = Instant::now();
        for i in 0..iters {
            tx.send(black_box(i)).unwrap();
        }
        wait_for(&self.handled, target);
        start.elapsed()
    }
}

impl Drop for RawChannel {
    fn drop(&mut self) {
        drop(self.tx.take());
        self.consumer.take().unwrap().join().unwrap();
    }
}

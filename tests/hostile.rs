//! Hostile use, each with its documented outcome: subscribing from inside a handler (through a
//! captured handle, which keeps the bus alive until `shutdown` is called), zero-sized and very
//! large events, and dropping the bus while its handlers run. (Flush and
//! shutdown from a handler, unsubscribing from one, publishing from one into a full shard, a
//! handler past the deadline, a captured handle and publishing during shutdown have their own
//! tests in `lifetime.rs`, `subscribe.rs`, `outbox.rs`, `shutdown.rs` and `batch.rs`.)

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Numbered, WAIT, count};
use microbus::{Bus, Context, Event, HandlerResult, Subscription};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Nothing;
impl Event for Nothing {
    const NAME: &'static str = "Nothing";
}

/// A kilobyte by value: it does not fit a channel slot and travels boxed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Wide {
    seq: u64,
    a: [u64; 32],
    b: [u64; 32],
    c: [u64; 32],
    d: [u64; 31],
}
impl Event for Wide {
    const NAME: &'static str = "Wide";
}

/// A megabyte on the heap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Blob {
    seq: u64,
    bytes: Vec<u8>,
}
impl Event for Blob {
    const NAME: &'static str = "Blob";
}

#[test]
fn a_handler_may_subscribe_and_the_new_handler_hears_later_events() {
    let bus = Bus::builder().workers(2).build().unwrap();
    let heard = Arc::new(AtomicU64::new(0));
    let added: Arc<Mutex<Option<Subscription>>> = Arc::default();
    {
        // Capturing a handle keeps the bus alive until `shutdown` is called (below).
        let (inner, heard, added) = (bus.clone(), heard.clone(), added.clone());
        bus.subscribe(move |_: &Nothing, _: &Context| -> HandlerResult {
            let heard = heard.clone();
            let sub = inner.subscribe(move |_: &Numbered, _: &Context| -> HandlerResult {
                heard.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })?;
            *added.lock().unwrap() = Some(sub);
            Ok(())
        })
        .unwrap();
    }
    bus.publish(Nothing).unwrap();
    bus.flush(WAIT).unwrap();
    assert!(added.lock().unwrap().is_some());
    for seq in 0..1_000 {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    bus.flush(WAIT).unwrap();
    assert_eq!(count(&heard), 1_000);
    assert!(bus.shutdown().unwrap().is_balanced());
}

#[test]
fn zero_sized_events_are_delivered_and_counted() {
    let bus = Bus::builder().workers(2).build().unwrap();
    let heard = Arc::new(AtomicU64::new(0));
    {
        let heard = heard.clone();
        bus.subscribe(move |e: &Nothing, _: &Context| -> HandlerResult {
            assert_eq!(*e, Nothing);
            heard.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
    }
    for _ in 0..10_000 {
        bus.publish(Nothing).unwrap();
    }
    bus.publish_batch(std::iter::repeat_n(Nothing, 10_000))
        .unwrap();
    bus.flush(WAIT).unwrap();
    assert_eq!(count(&heard), 20_000);
    assert_eq!(
        bus.metrics().event("Nothing", "app").unwrap().published,
        20_000
    );
    assert!(bus.shutdown().unwrap().is_balanced());
}

#[test]
fn very_large_events_arrive_whole() {
    let bus = Bus::builder()
        .workers(2)
        .channel_capacity(4)
        .build()
        .unwrap();
    let wide_sum = Arc::new(AtomicU64::new(0));
    let blob_sum = Arc::new(AtomicU64::new(0));
    {
        let wide_sum = wide_sum.clone();
        bus.subscribe(move |e: &Wide, _: &Context| -> HandlerResult {
            assert!(
                e.a.iter()
                    .chain(&e.b)
                    .chain(&e.c)
                    .chain(&e.d)
                    .all(|&v| v == e.seq)
            );
            wide_sum.fetch_add(e.seq, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
    }
    {
        let blob_sum = blob_sum.clone();
        bus.subscribe(move |e: &Blob, _: &Context| -> HandlerResult {
            assert_eq!(e.bytes.len(), 1 << 20);
            assert!(e.bytes.iter().all(|&b| b == e.seq as u8));
            blob_sum.fetch_add(e.seq, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
    }
    for seq in 0..2_000u64 {
        bus.publish(Wide {
            seq,
            a: [seq; 32],
            b: [seq; 32],
            c: [seq; 32],
            d: [seq; 31],
        })
        .unwrap();
    }
    for seq in 0..64u64 {
        bus.publish(Blob {
            seq,
            bytes: vec![seq as u8; 1 << 20],
        })
        .unwrap();
    }
    bus.flush(WAIT).unwrap();
    assert_eq!(count(&wide_sum), (0..2_000).sum::<u64>());
    assert_eq!(count(&blob_sum), (0..64).sum::<u64>());
    assert!(bus.shutdown().unwrap().is_balanced());
}

#[test]
fn dropping_the_bus_while_handlers_run_lets_them_finish_what_was_accepted() {
    let bus = Bus::builder()
        .workers(2)
        .shutdown_timeout(WAIT)
        .build()
        .unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    {
        let handled = handled.clone();
        bus.subscribe(move |_: &Numbered, _: &Context| -> HandlerResult {
            std::thread::sleep(Duration::from_millis(1));
            handled.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
    }
    for seq in 0..200 {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    // Handlers are running: dropping the last handle shuts the bus down as `shutdown` does,
    // and returns once the workers have finished and been joined.
    drop(bus);
    assert_eq!(count(&handled), 200);
}

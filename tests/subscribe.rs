//! Subscribing: source filters, handler types, and unsubscribe.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use common::{Numbered, WAIT, count};
use microbus::{
    Bus, Context, Handler, HandlerResult, SubscribeError, SubscribeOptions, Subscription,
};

#[test]
fn subscribe_from_sees_only_that_source() {
    let bus = Bus::builder().workers(2).build().unwrap();
    let a = bus.service("A").unwrap();
    let b = bus.service("B").unwrap();
    let from_a = Arc::new(Mutex::new(Vec::new()));
    let from_any = Arc::new(AtomicU64::new(0));
    {
        let from_a = from_a.clone();
        bus.subscribe_from("A", move |e: &Numbered, ctx: &Context| -> HandlerResult {
            from_a
                .lock()
                .unwrap()
                .push((ctx.source(), e.publisher, e.seq));
            Ok(())
        })
        .unwrap();
        let from_any = from_any.clone();
        bus.subscribe(move |_: &Numbered, _: &Context| -> HandlerResult {
            from_any.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
        .unwrap();
    }
    for seq in 0..10 {
        a.publish(Numbered { publisher: 1, seq }).unwrap();
        b.publish(Numbered { publisher: 2, seq }).unwrap();
    }
    bus.flush(WAIT).unwrap();
    let mut seen = from_a.lock().unwrap().clone();
    seen.sort();
    let expected: Vec<_> = (0..10).map(|seq| ("A", 1, seq)).collect();
    assert_eq!(seen, expected);
    assert_eq!(count(&from_any), 20);
    assert_eq!(bus.stats().delivered, 30);
}

struct Recorder {
    seen: Arc<AtomicU64>,
}

impl Handler<Numbered> for Recorder {
    fn handle(&self, _: &Numbered, ctx: &Context<'_>) -> HandlerResult {
        assert_eq!(ctx.handler_name(), "recorder");
        assert_eq!(ctx.service(), "Audit");
        assert_eq!(ctx.attempt(), 1);
        self.seen.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn name(&self) -> &str {
        "recorder"
    }
}

#[test]
fn handler_types_subscribe_under_their_name() {
    let bus = Bus::builder().workers(1).build().unwrap();
    let audit = bus.service("Audit").unwrap();
    let seen = Arc::new(AtomicU64::new(0));
    let sub = audit
        .subscribe_handler(Recorder { seen: seen.clone() })
        .unwrap();
    assert_eq!(sub.handler_name(), "recorder");
    assert_eq!(sub.event_name(), "Numbered");
    assert_eq!(sub.service(), "Audit");
    let named = bus
        .subscribe_with(
            SubscribeOptions::new().named("tally"),
            |_: &Numbered, _: &Context| -> HandlerResult { Ok(()) },
        )
        .unwrap();
    assert_eq!(named.handler_name(), "tally");
    bus.publish(Numbered {
        publisher: 0,
        seq: 0,
    })
    .unwrap();
    bus.flush(WAIT).unwrap();
    assert_eq!(count(&seen), 1);
    assert_eq!(bus.stats().succeeded, 2);
}

#[test]
fn bad_source_names_and_closed_buses_refuse_subscriptions() {
    let bus = Bus::builder().workers(1).build().unwrap();
    let err = bus
        .subscribe_from("", |_: &Numbered, _: &Context| -> HandlerResult { Ok(()) })
        .unwrap_err();
    assert_eq!(err, SubscribeError::InvalidSource);
    bus.shutdown().unwrap();
    let err = bus
        .subscribe(|_: &Numbered, _: &Context| -> HandlerResult { Ok(()) })
        .unwrap_err();
    assert_eq!(err, SubscribeError::Shutdown);
}

#[test]
fn unsubscribe_waits_for_the_running_call_and_cancels_the_queued_ones() {
    const EVENTS: u64 = 1_000;
    const HOLD_AT: u64 = 100;
    let bus = Bus::builder()
        .workers(1)
        .channel_capacity(2 * EVENTS as usize)
        .build()
        .unwrap();
    let (entered_tx, entered_rx) = crossbeam_channel::bounded(1);
    let (release_tx, release_rx) = crossbeam_channel::bounded::<()>(1);
    let calls = Arc::new(AtomicU64::new(0));
    let sub = {
        let calls = calls.clone();
        Arc::new(
            bus.subscribe(move |e: &Numbered, _: &Context| -> HandlerResult {
                if e.seq == HOLD_AT {
                    entered_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                }
                calls.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
            .unwrap(),
        )
    };
    for seq in 0..EVENTS {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    entered_rx.recv().unwrap();
    let unsubscriber = {
        let sub = sub.clone();
        std::thread::spawn(move || sub.unsubscribe())
    };
    while sub.is_active() {
        std::thread::yield_now();
    }
    // The held call is still running, so unsubscribe is still waiting for it.
    assert!(!unsubscriber.is_finished());
    assert_eq!(count(&calls), HOLD_AT);
    release_tx.send(()).unwrap();
    unsubscriber.join().unwrap();
    assert_eq!(count(&calls), HOLD_AT + 1);
    bus.flush(WAIT).unwrap();
    assert_eq!(count(&calls), HOLD_AT + 1);
    let cancelled = EVENTS - HOLD_AT - 1;
    assert_eq!(sub.stats().cancelled, cancelled);
    let stats = bus.stats();
    assert_eq!(stats.cancelled, cancelled);
    assert_eq!(stats.delivered, EVENTS);
    assert!(stats.is_balanced());
    // Later events match nothing.
    bus.publish(Numbered {
        publisher: 0,
        seq: EVENTS,
    })
    .unwrap();
    bus.flush(WAIT).unwrap();
    assert_eq!(bus.stats().unmatched, 1);
}

#[test]
fn no_call_starts_after_unsubscribe_returns_while_events_flow() {
    const EVENTS: u64 = 50_000;
    let bus = Bus::builder().workers(2).build().unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let sub = {
        let calls = calls.clone();
        bus.subscribe(move |_: &Numbered, _: &Context| -> HandlerResult {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap()
    };
    let publisher = {
        let bus = bus.clone();
        std::thread::spawn(move || {
            for seq in 0..EVENTS {
                bus.publish(Numbered { publisher: 0, seq }).unwrap();
            }
        })
    };
    while count(&calls) < 1_000 {
        std::thread::yield_now();
    }
    sub.unsubscribe();
    let at_return = count(&calls);
    publisher.join().unwrap();
    bus.flush(WAIT).unwrap();
    assert_eq!(
        count(&calls),
        at_return,
        "a call started after unsubscribe returned"
    );
    let stats = bus.stats();
    assert_eq!(stats.delivered, at_return + sub.stats().cancelled);
    assert_eq!(stats.delivered + stats.unmatched, EVENTS);
    assert!(stats.is_balanced());
}

#[test]
fn a_handler_can_unsubscribe_itself() {
    let bus = Bus::builder().workers(1).build().unwrap();
    let me: Arc<OnceLock<Subscription>> = Arc::new(OnceLock::new());
    let calls = Arc::new(AtomicU64::new(0));
    let sub = {
        let (me, calls) = (me.clone(), calls.clone());
        bus.subscribe(move |e: &Numbered, _: &Context| -> HandlerResult {
            calls.fetch_add(1, Ordering::SeqCst);
            if e.seq == 5 {
                me.get().unwrap().unsubscribe();
            }
            Ok(())
        })
        .unwrap()
    };
    me.set(sub).unwrap();
    for seq in 0..10 {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    bus.flush(WAIT).unwrap();
    assert_eq!(count(&calls), 6);
    assert_eq!(me.get().unwrap().stats().cancelled, 4);
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Ping;
impl microbus::Event for Ping {
    const NAME: &'static str = "Ping";
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Pong;
impl microbus::Event for Pong {
    const NAME: &'static str = "Pong";
}

#[test]
fn handlers_on_two_workers_can_unsubscribe_each_other() {
    let bus = Bus::builder().workers(2).build().unwrap();
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let ping_sub: Arc<OnceLock<Subscription>> = Arc::new(OnceLock::new());
    let pong_sub: Arc<OnceLock<Subscription>> = Arc::new(OnceLock::new());
    let done = Arc::new(AtomicU64::new(0));
    let ping = {
        let (barrier, other, done) = (barrier.clone(), pong_sub.clone(), done.clone());
        bus.subscribe(move |_: &Ping, _: &Context| -> HandlerResult {
            barrier.wait();
            other.get().unwrap().unsubscribe();
            done.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap()
    };
    let pong = {
        let (barrier, other, done) = (barrier.clone(), ping_sub.clone(), done.clone());
        bus.subscribe(move |_: &Pong, _: &Context| -> HandlerResult {
            barrier.wait();
            other.get().unwrap().unsubscribe();
            done.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap()
    };
    ping_sub.set(ping).unwrap();
    pong_sub.set(pong).unwrap();
    // Unkeyed events from one thread take the shards in turn: one event on each worker.
    bus.publish(Ping).unwrap();
    bus.publish(Pong).unwrap();
    bus.flush(WAIT).unwrap();
    assert_eq!(count(&done), 2);
    assert!(!ping_sub.get().unwrap().is_active());
    assert!(!pong_sub.get().unwrap().is_active());
}

//! The Redis Streams bridge against a real `redis-server` on loopback, named by
//! `MICROBUS_REDIS_URL` (`.ci/run` starts one). Without it these tests fail and say so.
#![cfg(feature = "redis")]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::WAIT;
use microbus::bridge::Bridge;
use microbus::{Bus, Context, Envelope, Event, EventId, HandlerResult, Publish};
use serde::{Deserialize, Serialize};

fn redis_url() -> String {
    std::env::var("MICROBUS_REDIS_URL").expect(
        "these tests need a Redis server: set MICROBUS_REDIS_URL (for example \
         redis://127.0.0.1:6379), as .ci/run does",
    )
}

/// A key prefix of its own for each test run.
fn prefix(test: &str) -> String {
    format!("microbus-test:{test}:{}", EventId::new())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct OrderCreated {
    order_id: u64,
}
impl Event for OrderCreated {
    const NAME: &'static str = "OrderCreated";
}

#[test]
fn ten_thousand_events_cross_with_their_envelopes() {
    const EVENTS: u64 = 10_000;
    let url = redis_url();
    let prefix = prefix("round-trip");

    let orders = Bus::builder()
        .service_name("orders")
        .workers(2)
        .build()
        .unwrap();
    let sent: Arc<Mutex<HashMap<EventId, Envelope>>> = Arc::default();
    {
        let sent = sent.clone();
        orders.tap(move |t| {
            sent.lock()
                .unwrap()
                .insert(t.envelope().id(), t.envelope().clone());
        });
    }
    let exporter = Bridge::connect(&orders, &url, &prefix).unwrap();
    exporter.export::<OrderCreated>().unwrap();

    let payments = Bus::builder()
        .service_name("payments")
        .workers(2)
        .build()
        .unwrap();
    let received: Arc<Mutex<Vec<(u64, Envelope)>>> = Arc::default();
    {
        let received = received.clone();
        payments
            .subscribe(move |e: &OrderCreated, ctx: &Context| -> HandlerResult {
                received
                    .lock()
                    .unwrap()
                    .push((e.order_id, ctx.envelope().clone()));
                Ok(())
            })
            .unwrap();
    }
    let importer = Bridge::connect(&payments, &url, &prefix).unwrap();
    importer.import::<OrderCreated>("payments").unwrap();

    let started = Instant::now();
    for order_id in 0..EVENTS {
        orders
            .publish_with(
                OrderCreated { order_id },
                Publish::keyed(order_id % 16).header("tenant", "acme"),
            )
            .unwrap();
    }
    orders.flush(WAIT).unwrap();
    let exported_in = started.elapsed();
    while (received.lock().unwrap().len() as u64) < EVENTS && started.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(5));
    }
    let round_trip = started.elapsed();
    payments.flush(WAIT).unwrap();
    importer.stop();
    println!(
        "bridge: {EVENTS} events exported in {exported_in:?} ({:.0}/s), through in {round_trip:?} ({:.0}/s)",
        EVENTS as f64 / exported_in.as_secs_f64(),
        EVENTS as f64 / round_trip.as_secs_f64()
    );

    let received = received.lock().unwrap();
    let sent = sent.lock().unwrap();
    assert_eq!(received.len() as u64, EVENTS, "each event handled once");
    let mut seen = vec![false; EVENTS as usize];
    for (order_id, envelope) in received.iter() {
        assert!(!seen[*order_id as usize], "order {order_id} handled twice");
        seen[*order_id as usize] = true;
        assert_eq!(
            sent.get(&envelope.id()),
            Some(envelope),
            "the envelope crossed unchanged"
        );
    }
    assert_eq!(importer.stats().acked, EVENTS);
    assert_eq!(exporter.stats().exported, EVENTS);
    orders.shutdown().unwrap();
    payments.shutdown().unwrap();
}

//! The order flow split over two processes that talk through Redis Streams: `orders` (with
//! notifications) publishes orders and hears what happened to them; `payments` (with shipping)
//! charges and ships them. Start the payments process, then the orders process:
//!
//! ```text
//! cargo run --release --features redis --example bridge_orders -- payments redis://127.0.0.1:6379
//! cargo run --release --features redis --example bridge_orders -- orders redis://127.0.0.1:6379
//! ```
//!
//! Each process exits once the orders (`--orders N`, 1,000 by default) have gone through; the
//! orders process prints one order's causal chain across the two processes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use microbus::bridge::Bridge;
use microbus::{Bus, Context, Envelope, Event, HandlerResult, Publish};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderCreated {
    order_id: u64,
    total_cents: i64,
}
impl Event for OrderCreated {
    const NAME: &'static str = "OrderCreated";
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PaymentCaptured {
    order_id: u64,
}
impl Event for PaymentCaptured {
    const NAME: &'static str = "PaymentCaptured";
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderShipped {
    order_id: u64,
}
impl Event for OrderShipped {
    const NAME: &'static str = "OrderShipped";
}

const PREFIX: &str = "microbus-example";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let role = args.first().map(String::as_str).unwrap_or("");
    let url = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned());
    let orders: u64 = match args.iter().position(|a| a == "--orders") {
        Some(i) => args.get(i + 1).ok_or("--orders needs a number")?.parse()?,
        None => 1_000,
    };
    match role {
        "orders" => run_orders(&url, orders),
        "payments" => run_payments(&url, orders),
        _ => Err("usage: bridge_orders (orders|payments) [redis-url] [--orders N]".into()),
    }
}

/// Waits until `count` reaches `target`, or a minute passes.
fn wait_for(count: &AtomicU64, target: u64) -> Result<(), Box<dyn std::error::Error>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while count.load(Ordering::SeqCst) < target {
        if Instant::now() > deadline {
            return Err(
                format!("only {} of {target} arrived", count.load(Ordering::SeqCst)).into(),
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Orders and notifications: publish orders, hear that they were paid and shipped.
fn run_orders(url: &str, orders: u64) -> Result<(), Box<dyn std::error::Error>> {
    let bus = Bus::builder().service_name("orders").build()?;
    let notifications = bus.service("notifications")?;
    // The envelopes of order 1's events, as they arrive here.
    let chain: Arc<Mutex<Vec<(&'static str, Envelope)>>> = Arc::default();
    let shipped = Arc::new(AtomicU64::new(0));
    {
        let chain = chain.clone();
        notifications.subscribe(move |e: &PaymentCaptured, ctx: &Context| -> HandlerResult {
            if e.order_id == 1 {
                chain
                    .lock()
                    .unwrap()
                    .push(("PaymentCaptured", ctx.envelope().clone()));
            }
            Ok(())
        })?;
    }
    {
        let (chain, shipped) = (chain.clone(), shipped.clone());
        notifications.subscribe(move |e: &OrderShipped, ctx: &Context| -> HandlerResult {
            if e.order_id == 1 {
                chain
                    .lock()
                    .unwrap()
                    .push(("OrderShipped", ctx.envelope().clone()));
            }
            shipped.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })?;
    }
    {
        let chain = chain.clone();
        bus.tap(move |t| {
            if t.event_name() == "OrderCreated" && t.payload_json().contains("\"order_id\":1,") {
                chain
                    .lock()
                    .unwrap()
                    .push(("OrderCreated", t.envelope().clone()));
            }
        });
    }
    let bridge = Bridge::connect(&bus, url, PREFIX)?;
    bridge.export::<OrderCreated>()?;
    bridge.import::<PaymentCaptured>("orders")?;
    bridge.import::<OrderShipped>("orders")?;

    let started = Instant::now();
    for order_id in 0..orders {
        let order = OrderCreated {
            order_id,
            total_cents: 1_000 + order_id as i64,
        };
        bus.publish_with(order, Publish::keyed(order_id))?;
    }
    wait_for(&shipped, orders)?;
    let elapsed = started.elapsed();
    println!(
        "{orders} orders created, paid and shipped across two processes in {:.0} ms ({:.0} orders/s)",
        elapsed.as_secs_f64() * 1e3,
        orders as f64 / elapsed.as_secs_f64()
    );
    println!("order 1, one conversation across the processes:");
    let chain = chain.lock().unwrap();
    for (event, envelope) in chain.iter() {
        println!(
            "  {event:<16} id {} from {:<9} correlation {} caused by {}",
            envelope.id(),
            envelope.source(),
            envelope.correlation_id(),
            envelope
                .causation_id()
                .map_or("-".to_owned(), |c| c.to_string()),
        );
    }
    let stats = bridge.stats();
    println!(
        "bridge: {} exported, {} imported, {} acknowledged",
        stats.exported, stats.imported, stats.acked
    );
    bridge.stop();
    bus.shutdown()?;
    Ok(())
}

/// Payments and shipping: charge each order, ship each paid one.
fn run_payments(url: &str, orders: u64) -> Result<(), Box<dyn std::error::Error>> {
    let bus = Bus::builder().service_name("payments").build()?;
    let shipping = bus.service("shipping")?;
    let shipped = Arc::new(AtomicU64::new(0));
    bus.subscribe_from(
        "orders",
        |order: &OrderCreated, ctx: &Context| -> HandlerResult {
            ctx.publish(PaymentCaptured {
                order_id: order.order_id,
            })?;
            Ok(())
        },
    )?;
    {
        let shipped = shipped.clone();
        shipping.subscribe(
            move |paid: &PaymentCaptured, ctx: &Context| -> HandlerResult {
                ctx.publish(OrderShipped {
                    order_id: paid.order_id,
                })?;
                shipped.fetch_add(1, Ordering::SeqCst);
                Ok(())
            },
        )?;
    }
    let bridge = Bridge::connect(&bus, url, PREFIX)?;
    // Exports first: an import may publish at once, and what it causes must find them.
    bridge.export::<PaymentCaptured>()?;
    bridge.export::<OrderShipped>()?;
    bridge.import::<OrderCreated>("payments")?;
    println!("payments and shipping are waiting for {orders} orders");
    wait_for(&shipped, orders)?;
    bus.flush(Duration::from_secs(30))?;
    let stats = bridge.stats();
    println!(
        "{orders} orders paid and shipped; bridge: {} imported, {} exported",
        stats.imported, stats.exported
    );
    bridge.stop();
    bus.shutdown()?;
    Ok(())
}

//! The e-commerce flow across five services of one program.
//!
//! OrderService publishes `OrderCreated`; PaymentService, InventoryService and
//! NotificationService each react on their own; PaymentService publishes `OrderPaid`;
//! ShippingService reacts and publishes `ShipmentCreated`; NotificationService sends the
//! tracking message. The example first follows one order on a bus that keeps a trace and prints
//! the conversation's causal tree from `bus.trace`, then runs many orders through the same flow
//! and prints the throughput and per-service counts.
//!
//! ```text
//! cargo run --release --example order_flow [-- --orders 100000]
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use microbus::{Bus, Context, Event, EventId, HandlerResult, Publish, SubscribeOptions, Trace};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderCreated {
    order_id: u64,
    customer_id: u64,
    total_cents: i64,
    email: String,
}
impl Event for OrderCreated {
    const NAME: &'static str = "OrderCreated";
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderPaid {
    order_id: u64,
    amount_cents: i64,
}
impl Event for OrderPaid {
    const NAME: &'static str = "OrderPaid";
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ShipmentCreated {
    order_id: u64,
    tracking: String,
}
impl Event for ShipmentCreated {
    const NAME: &'static str = "ShipmentCreated";
}

/// What each service did.
#[derive(Default)]
struct Counts {
    payments: AtomicU64,
    reservations: AtomicU64,
    confirmations: AtomicU64,
    shipments: AtomicU64,
    tracking_messages: AtomicU64,
}

fn wire(bus: &Bus, counts: &Arc<Counts>) -> Result<(), Box<dyn std::error::Error>> {
    let payments = bus.service("PaymentService")?;
    let inventory = bus.service("InventoryService")?;
    let shipping = bus.service("ShippingService")?;
    let notifications = bus.service("NotificationService")?;

    let c = counts.clone();
    payments.subscribe_with(
        SubscribeOptions::new()
            .named("take-payment")
            .from("OrderService"),
        move |order: &OrderCreated, ctx: &Context| -> HandlerResult {
            c.payments.fetch_add(1, Ordering::Relaxed);
            ctx.publish_with(
                OrderPaid {
                    order_id: order.order_id,
                    amount_cents: order.total_cents,
                },
                Publish::keyed(order.order_id),
            )?;
            Ok(())
        },
    )?;

    let c = counts.clone();
    inventory.subscribe_with(
        SubscribeOptions::new()
            .named("reserve-stock")
            .from("OrderService"),
        move |_: &OrderCreated, _: &Context| -> HandlerResult {
            c.reservations.fetch_add(1, Ordering::Relaxed);
            Ok(())
        },
    )?;

    let c = counts.clone();
    notifications.subscribe_with(
        SubscribeOptions::new()
            .named("send-confirmation")
            .from("OrderService"),
        move |order: &OrderCreated, _: &Context| -> HandlerResult {
            std::hint::black_box(format!(
                "Thanks for order {} sent to {}",
                order.order_id, order.email
            ));
            c.confirmations.fetch_add(1, Ordering::Relaxed);
            Ok(())
        },
    )?;

    let c = counts.clone();
    shipping.subscribe_with(
        SubscribeOptions::new()
            .named("create-shipment")
            .from("PaymentService"),
        move |paid: &OrderPaid, ctx: &Context| -> HandlerResult {
            c.shipments.fetch_add(1, Ordering::Relaxed);
            ctx.publish_with(
                ShipmentCreated {
                    order_id: paid.order_id,
                    tracking: format!("TRK{:010}", paid.order_id),
                },
                Publish::keyed(paid.order_id),
            )?;
            Ok(())
        },
    )?;

    let c = counts.clone();
    notifications.subscribe_with(
        SubscribeOptions::new()
            .named("send-tracking")
            .from("ShippingService"),
        move |shipment: &ShipmentCreated, _: &Context| -> HandlerResult {
            std::hint::black_box(format!(
                "Order {} is on its way: {}",
                shipment.order_id, shipment.tracking
            ));
            c.tracking_messages.fetch_add(1, Ordering::Relaxed);
            Ok(())
        },
    )?;
    Ok(())
}

fn order(order_id: u64) -> OrderCreated {
    OrderCreated {
        order_id,
        customer_id: order_id % 977,
        total_cents: 1_000 + (order_id % 50_000) as i64,
        email: format!("customer{}@example.com", order_id % 977),
    }
}

/// Prints one order's conversation from the bus's trace ring and checks that it links up.
fn print_chain(trace: &Trace) -> bool {
    println!("One order, followed through the services (bus.trace):");
    print!("{trace}");
    let first = |name: &str| trace.entries.iter().find(|e| e.event == name);
    let root = first("OrderCreated").map(|e| e.event_id);
    let linked = trace.entries.len() == 5
        && trace.events().len() == 3
        && trace
            .entries
            .iter()
            .all(|e| e.correlation_id == trace.correlation_id)
        && first("OrderCreated").is_some_and(|e| e.causation_id.is_none())
        && first("OrderPaid").and_then(|e| e.causation_id) == root
        && first("ShipmentCreated").and_then(|e| e.causation_id)
            == first("OrderPaid").map(|e| e.event_id);
    println!(
        "{}",
        if linked {
            "Every event carries the order's correlation id, and each names its parent as its causation."
        } else {
            "THE CHAIN DOES NOT LINK UP"
        }
    );
    linked
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut orders: u64 = 100_000;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--orders" => orders = args.next().ok_or("--orders needs a number")?.parse()?,
            other => return Err(format!("unknown argument {other:?}; try --orders N").into()),
        }
    }

    // One order on a bus that keeps a trace of its deliveries.
    let linked = {
        let bus = Bus::builder()
            .service_name("OrderService")
            .trace_capacity(64)
            .build()?;
        wire(&bus, &Arc::new(Counts::default()))?;
        let conversation = EventId::new();
        bus.publish_with(order(1), Publish::keyed(1u64).correlation(conversation))?;
        bus.flush(Duration::from_secs(10))?;
        print_chain(&bus.trace(conversation))
    };

    // Many orders on a bus without the trace, for throughput.
    let bus = Bus::builder().service_name("OrderService").build()?;
    let counts = Arc::new(Counts::default());
    wire(&bus, &counts)?;
    println!(
        "\n{orders} orders through the same flow on {} workers:",
        bus.workers()
    );
    let started = Instant::now();
    for order_id in 1..=orders {
        bus.publish_with(order(order_id), Publish::keyed(order_id))?;
    }
    bus.flush(Duration::from_secs(60))?;
    let elapsed = started.elapsed();
    let events = 3 * orders;
    let deliveries = bus.stats().delivered;
    println!(
        "  {events} events ({deliveries} deliveries) in {:.2?}: {:.0} events/s, {:.0} deliveries/s",
        elapsed,
        events as f64 / elapsed.as_secs_f64(),
        deliveries as f64 / elapsed.as_secs_f64()
    );
    let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
    for (service, what, counter) in [
        ("PaymentService", "payments taken", &counts.payments),
        ("InventoryService", "stock reserved", &counts.reservations),
        (
            "NotificationService",
            "confirmations sent",
            &counts.confirmations,
        ),
        ("ShippingService", "shipments created", &counts.shipments),
        (
            "NotificationService",
            "tracking messages",
            &counts.tracking_messages,
        ),
    ] {
        println!("  {service:<20} {what:<20} {:>9}", count(counter));
    }

    let report = bus.shutdown()?;
    println!("\n{report}");
    let all_handled = [
        &counts.payments,
        &counts.reservations,
        &counts.confirmations,
        &counts.shipments,
        &counts.tracking_messages,
    ]
    .iter()
    .all(|c| count(c) == orders);
    if !(linked && all_handled && report.is_balanced()) {
        return Err("the flow did not complete as expected".into());
    }
    Ok(())
}

//! The e-commerce flow across five services of one program.
//!
//! OrderService publishes `OrderCreated`; PaymentService, InventoryService and
//! NotificationService each react on their own; PaymentService publishes `OrderPaid`;
//! ShippingService reacts and publishes `ShipmentCreated`; NotificationService sends the
//! tracking message. The example first follows one order and prints its chain of events, then
//! runs many orders through the same flow and prints the throughput and per-service counts.
//!
//! ```text
//! cargo run --release --example order_flow [-- --orders 100000]
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use microbus::{Bus, Context, Event, EventId, HandlerResult, Publish};
use parking_lot::Mutex;
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

/// One delivery of the traced order: which service saw which event, and its envelope.
struct Step {
    service: String,
    event: &'static str,
    id: EventId,
    source: &'static str,
    correlation: EventId,
    causation: Option<EventId>,
}

/// Records the deliveries of one order.
#[derive(Default)]
struct Trace {
    order_id: AtomicU64,
    steps: Mutex<Vec<Step>>,
}

impl Trace {
    fn record(&self, order_id: u64, ctx: &Context<'_>) {
        if order_id == self.order_id.load(Ordering::Relaxed) {
            self.steps.lock().push(Step {
                service: ctx.service().to_owned(),
                event: ctx.event_name(),
                id: ctx.event_id(),
                source: ctx.source(),
                correlation: ctx.correlation_id(),
                causation: ctx.causation_id(),
            });
        }
    }
}

fn wire(
    bus: &Bus,
    counts: &Arc<Counts>,
    trace: &Arc<Trace>,
) -> Result<(), Box<dyn std::error::Error>> {
    let payments = bus.service("PaymentService")?;
    let inventory = bus.service("InventoryService")?;
    let shipping = bus.service("ShippingService")?;
    let notifications = bus.service("NotificationService")?;

    let (c, t) = (counts.clone(), trace.clone());
    payments.subscribe_from(
        "OrderService",
        move |order: &OrderCreated, ctx: &Context| -> HandlerResult {
            t.record(order.order_id, ctx);
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

    let (c, t) = (counts.clone(), trace.clone());
    inventory.subscribe_from(
        "OrderService",
        move |order: &OrderCreated, ctx: &Context| -> HandlerResult {
            t.record(order.order_id, ctx);
            c.reservations.fetch_add(1, Ordering::Relaxed);
            Ok(())
        },
    )?;

    let (c, t) = (counts.clone(), trace.clone());
    notifications.subscribe_from(
        "OrderService",
        move |order: &OrderCreated, ctx: &Context| -> HandlerResult {
            t.record(order.order_id, ctx);
            std::hint::black_box(format!(
                "Thanks for order {} sent to {}",
                order.order_id, order.email
            ));
            c.confirmations.fetch_add(1, Ordering::Relaxed);
            Ok(())
        },
    )?;

    let (c, t) = (counts.clone(), trace.clone());
    shipping.subscribe_from(
        "PaymentService",
        move |paid: &OrderPaid, ctx: &Context| -> HandlerResult {
            t.record(paid.order_id, ctx);
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

    let (c, t) = (counts.clone(), trace.clone());
    notifications.subscribe_from(
        "ShippingService",
        move |shipment: &ShipmentCreated, ctx: &Context| -> HandlerResult {
            t.record(shipment.order_id, ctx);
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

fn print_chain(trace: &Trace) -> bool {
    let steps = trace.steps.lock();
    // The events in the order they were first handled, each with the services that handled it.
    let mut events: Vec<(&Step, Vec<&str>)> = Vec::new();
    for step in steps.iter() {
        match events.iter_mut().find(|(e, _)| e.id == step.id) {
            Some((_, services)) => services.push(&step.service),
            None => events.push((step, vec![&step.service])),
        }
    }
    println!("One order, followed through the services:");
    let mut depth_of: Vec<(EventId, usize)> = Vec::new();
    for (event, services) in &events {
        let depth = event
            .causation
            .and_then(|c| depth_of.iter().find(|(id, _)| *id == c))
            .map_or(0, |(_, d)| d + 1);
        depth_of.push((event.id, depth));
        let indent = "    ".repeat(depth);
        println!("{indent}{} {} from {}", event.event, event.id, event.source);
        println!(
            "{indent}    correlation {}  causation {}",
            event.correlation,
            event
                .causation
                .map_or_else(|| "(none: a root event)".to_owned(), |c| c.to_string())
        );
        println!("{indent}    handled by {}", services.join(", "));
    }
    let root = events.first().map(|(e, _)| e.id);
    let id_of = |name: &str| {
        events
            .iter()
            .find(|(e, _)| e.event == name)
            .map(|(e, _)| e.id)
    };
    let cause_of = |name: &str| {
        events
            .iter()
            .find(|(e, _)| e.event == name)
            .and_then(|(e, _)| e.causation)
    };
    let linked = steps.len() == 5
        && events.len() == 3
        && events.iter().all(|(e, _)| Some(e.correlation) == root)
        && cause_of("OrderCreated").is_none()
        && cause_of("OrderPaid") == id_of("OrderCreated")
        && cause_of("ShipmentCreated") == id_of("OrderPaid");
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

    let bus = Bus::builder().service_name("OrderService").build()?;
    let counts = Arc::new(Counts::default());
    let trace = Arc::new(Trace::default());
    wire(&bus, &counts, &trace)?;

    trace.order_id.store(1, Ordering::Relaxed);
    bus.publish_with(order(1), Publish::keyed(1u64))?;
    bus.flush(Duration::from_secs(10))?;
    let linked = print_chain(&trace);
    trace.order_id.store(u64::MAX, Ordering::Relaxed);

    println!(
        "\n{orders} orders through the same flow on {} workers:",
        bus.workers()
    );
    let before = bus.stats();
    let started = Instant::now();
    for order_id in 2..orders + 2 {
        bus.publish_with(order(order_id), Publish::keyed(order_id))?;
    }
    bus.flush(Duration::from_secs(60))?;
    let elapsed = started.elapsed();
    let after = bus.stats();
    let events = 3 * orders;
    let deliveries = after.delivered - before.delivered;
    println!(
        "  {events} events ({deliveries} deliveries) in {:.2?}: {:.0} events/s, {:.0} deliveries/s",
        elapsed,
        events as f64 / elapsed.as_secs_f64(),
        deliveries as f64 / elapsed.as_secs_f64()
    );
    let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
    println!(
        "  PaymentService       payments taken       {:>9}",
        count(&counts.payments)
    );
    println!(
        "  InventoryService     stock reserved       {:>9}",
        count(&counts.reservations)
    );
    println!(
        "  NotificationService  confirmations sent   {:>9}",
        count(&counts.confirmations)
    );
    println!(
        "  ShippingService      shipments created    {:>9}",
        count(&counts.shipments)
    );
    println!(
        "  NotificationService  tracking messages    {:>9}",
        count(&counts.tracking_messages)
    );

    let report = bus.shutdown()?;
    println!("\n{report}");
    let expected = orders + 1;
    let all_handled = [
        &counts.payments,
        &counts.reservations,
        &counts.confirmations,
        &counts.shipments,
        &counts.tracking_messages,
    ]
    .iter()
    .all(|c| count(c) == expected);
    if !(linked && all_handled && report.is_balanced()) {
        return Err("the flow did not complete as expected".into());
    }
    Ok(())
}

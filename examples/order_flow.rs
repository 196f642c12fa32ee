//! The e-commerce flow across five services of one program.
//!
//! OrderService publishes `OrderCreated`; PaymentService, InventoryService and
//! NotificationService each react on their own; PaymentService publishes `OrderPaid`;
//! ShippingService reacts and publishes `ShipmentCreated`; NotificationService sends the
//! tracking message. The example first follows one order on a bus that keeps a trace and prints
//! the conversation's causal tree from `bus.trace`, then runs many orders through the same flow
//! and prints the throughput and per-service counts. Last, it makes NotificationService slow
//! (each e-mail takes 2 ms) and shows how long payments and shipping take to finish with it on
//! the bus's own workers, and with it on a lane of its own.
//!
//! ```text
//! cargo run --release --example order_flow [-- --orders 100000]
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use microbus::{
    Bus, Context, Event, EventId, HandlerResult, Lane, Publish, SubscribeOptions, Trace,
};
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

/// How NotificationService sends its messages: at once, or taking `delay` a message on the
/// workers of `lane` (the bus's own when `None`).
#[derive(Clone, Copy, Default)]
struct Mail {
    delay: Option<Duration>,
    lane: Option<&'static str>,
}

impl Mail {
    fn options(self, name: &str, from: &str) -> SubscribeOptions {
        let options = SubscribeOptions::new().named(name).from(from);
        match self.lane {
            Some(lane) => options.lane(lane),
            None => options,
        }
    }

    fn send(self, message: String) {
        std::hint::black_box(message);
        if let Some(delay) = self.delay {
            std::thread::sleep(delay);
        }
    }
}

fn wire(bus: &Bus, counts: &Arc<Counts>, mail: Mail) -> Result<(), Box<dyn std::error::Error>> {
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
        mail.options("send-confirmation", "OrderService"),
        move |order: &OrderCreated, _: &Context| -> HandlerResult {
            mail.send(format!(
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
        mail.options("send-tracking", "ShippingService"),
        move |shipment: &ShipmentCreated, _: &Context| -> HandlerResult {
            mail.send(format!(
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
        wire(&bus, &Arc::new(Counts::default()), Mail::default())?;
        let conversation = EventId::new();
        bus.publish_with(order(1), Publish::keyed(1u64).correlation(conversation))?;
        bus.flush(Duration::from_secs(10))?;
        print_chain(&bus.trace(conversation))
    };

    // Many orders on a bus without the trace, for throughput.
    let bus = Bus::builder().service_name("OrderService").build()?;
    let counts = Arc::new(Counts::default());
    wire(&bus, &counts, Mail::default())?;
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

    // NotificationService made slow: on the bus's own workers, then on a lane of its own.
    let slow_orders = (orders / 100).clamp(50, 500);
    println!(
        "\n{slow_orders} orders with NotificationService taking 2 ms a message, on 2 workers:"
    );
    for lane in [None, Some("notifications")] {
        let (payments, shipments, all) = slow_mail(slow_orders, lane)?;
        println!(
            "  {:<34} payments done in {payments:>9.2?}, shipments in {shipments:>9.2?}, \
             every message sent in {all:>9.2?}",
            match lane {
                None => "notifications on the bus's workers",
                Some(_) => "notifications on their own lane",
            },
        );
    }
    Ok(())
}

/// Runs `orders` orders with a slow NotificationService on `lane` (or on the bus's own two
/// workers): how long until every payment was taken, every shipment created, and every
/// message sent.
fn slow_mail(
    orders: u64,
    lane: Option<&'static str>,
) -> Result<(Duration, Duration, Duration), Box<dyn std::error::Error>> {
    let mut builder = Bus::builder().service_name("OrderService").workers(2);
    if let Some(lane) = lane {
        builder = builder.lane(lane, Lane::new(2));
    }
    let bus = builder.build()?;
    let counts = Arc::new(Counts::default());
    let mail = Mail {
        delay: Some(Duration::from_millis(2)),
        lane,
    };
    wire(&bus, &counts, mail)?;
    let started = Instant::now();
    for order_id in 1..=orders {
        bus.publish_with(order(order_id), Publish::keyed(order_id))?;
    }
    let done = |c: &AtomicU64| c.load(Ordering::Relaxed) == orders;
    let (mut payments, mut shipments) = (None, None);
    while payments.is_none() || shipments.is_none() {
        if payments.is_none() && done(&counts.payments) {
            payments = Some(started.elapsed());
        }
        if shipments.is_none() && done(&counts.shipments) {
            shipments = Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    bus.flush(Duration::from_secs(60))?;
    let all = started.elapsed();
    if !bus.shutdown()?.is_balanced() {
        return Err("the books do not balance".into());
    }
    Ok((payments.unwrap_or(all), shipments.unwrap_or(all), all))
}

//! The metrics of a small order flow: 20,000 orders through payments (a few declined, some
//! retried) and shipping (a little CPU work each), events nobody listens to, and the report.
//!
//! ```text
//! cargo run --release --example metrics_report               # the table
//! cargo run --release --example metrics_report -- --json     # the snapshot as JSON
//! cargo run --release --example metrics_report -- --prometheus
//! ```

use std::hint::black_box;
use std::time::{Duration, Instant};

use microbus::{
    Bus, Context, Event, HandlerError, HandlerResult, Publish, RetryPolicy, SubscribeOptions,
};
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
struct PageViewed {
    page: u32,
}
impl Event for PageViewed {
    const NAME: &'static str = "PageViewed";
}

const ORDERS: u64 = 20_000;

/// Work that takes a few microseconds, like pricing a parcel.
fn price_parcel(order_id: u64) -> u64 {
    (0..2_000u64).fold(order_id, |acc, i| {
        black_box(acc.wrapping_mul(6364136223846793005).wrapping_add(i))
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let format = std::env::args().nth(1).unwrap_or_default();
    if !matches!(format.as_str(), "" | "--json" | "--prometheus") {
        return Err(format!("unknown flag {format:?}: use --json or --prometheus").into());
    }

    let bus = Bus::builder()
        .service_name("orders")
        .workers(2)
        .retry(RetryPolicy::exponential(Duration::from_millis(1)).max_attempts(3))
        .build()?;
    let payments = bus.service("payments")?;
    let shipping = bus.service("shipping")?;

    payments.subscribe_with(
        SubscribeOptions::default().named("capture").from("orders"),
        |order: &OrderCreated, ctx: &Context| -> HandlerResult {
            if order.order_id % 500 == 7 {
                return Err(HandlerError::permanent(HandlerError::msg("card declined")));
            }
            if order.order_id % 50 == 3 && ctx.attempt() == 1 {
                return Err(HandlerError::msg("gateway timeout"));
            }
            ctx.publish(PaymentCaptured {
                order_id: order.order_id,
            })?;
            Ok(())
        },
    )?;
    shipping.subscribe_with(
        SubscribeOptions::default().named("ship"),
        |paid: &PaymentCaptured, _: &Context| -> HandlerResult {
            black_box(price_parcel(paid.order_id));
            Ok(())
        },
    )?;

    let started = Instant::now();
    for order_id in 0..ORDERS {
        let order = OrderCreated {
            order_id,
            total_cents: 1_000 + (order_id % 90) as i64 * 100,
        };
        bus.publish_with(order, Publish::keyed(order_id))?;
        if order_id % 10 == 0 {
            // The storefront's events: no service listens to them yet.
            bus.publish(PageViewed {
                page: (order_id % 7) as u32,
            })?;
        }
    }
    bus.flush(Duration::from_secs(30))?;
    let elapsed = started.elapsed();

    let metrics = bus.metrics();
    match format.as_str() {
        "--json" => println!("{}", metrics.to_json()),
        "--prometheus" => print!("{}", metrics.to_prometheus()),
        _ => {
            println!(
                "{ORDERS} orders in {:.0} ms ({:.0} orders/s)\n",
                elapsed.as_secs_f64() * 1e3,
                ORDERS as f64 / elapsed.as_secs_f64()
            );
            print!("{metrics}");
        }
    }
    bus.shutdown()?;
    Ok(())
}

//! Retries and dead letters with a flaky payment handler.
//!
//! Some orders fail twice and then go through, some always fail, some are declined for good
//! (a permanent error, not retried), one makes the handler panic.
//! The example prints each attempt with its timing, then the dead letters and their JSON
//! export, then "fixes" the handler, redrives the dead letters and prints the final counts.
//!
//! ```text
//! cargo run --release --example retry_dead_letter
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The handler's panic is expected: keep its message off the output (it is in the dead
    // letter).
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("microbus-worker"))
        {
            default_hook(info);
        }
    }));

    let bus = Bus::builder()
        .service_name("OrderService")
        .workers(2)
        .retry(
            RetryPolicy::exponential(Duration::from_millis(20))
                .max_attempts(4)
                .jitter(0.1),
        )
        .retry_seed(7)
        .on_dead_letter(|letter| {
            println!(
                "  ALERT: {} {} dead-lettered ({})",
                letter.event_name(),
                letter.envelope().id(),
                letter.reason()
            )
        })
        .build()?;
    let payments = bus.service("PaymentService")?;
    let fixed = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    {
        let fixed = fixed.clone();
        payments.subscribe_with(
            SubscribeOptions::new()
                .named("charge-card")
                .from("OrderService"),
            move |order: &OrderCreated, ctx: &Context| -> HandlerResult {
                let at = started.elapsed().as_millis();
                let outcome: HandlerResult = if fixed.load(Ordering::SeqCst) {
                    Ok(())
                } else {
                    match order.order_id % 4 {
                        0 => Ok(()),
                        1 if ctx.attempt() >= 3 => Ok(()),
                        1 => Err(HandlerError::msg("payment gateway timed out")),
                        2 if order.order_id == 2 => panic!("card parser crashed on order 2"),
                        2 => Err(HandlerError::msg("payment gateway unreachable")),
                        _ => Err(HandlerError::permanent(HandlerError::msg(format_args!(
                            "card declined for order {}",
                            order.order_id
                        )))),
                    }
                };
                println!(
                    "  {at:>4} ms  order {:>2}  attempt {}  {}",
                    order.order_id,
                    ctx.attempt(),
                    match &outcome {
                        Ok(()) => "paid".to_owned(),
                        Err(e) => format!("failed: {e}"),
                    }
                );
                outcome
            },
        )?;
    }

    println!("Eight orders; the payment handler is flaky:");
    for order_id in 0..8 {
        bus.publish_with(
            OrderCreated {
                order_id,
                total_cents: 1_000 + order_id as i64,
            },
            Publish::keyed(order_id),
        )?;
    }
    bus.flush(Duration::from_secs(10))?;

    let dead = bus.dead_letters();
    println!("\nDead letters ({}):", dead.len());
    for letter in dead.list() {
        println!(
            "  #{} {} {} after {} attempts ({}): {}",
            letter.id(),
            letter.event_name(),
            letter.payload_json(),
            letter.attempts(),
            letter.reason(),
            letter.errors().join(" | ")
        );
    }
    println!("\nExported as JSON lines:");
    print!("{}", dead.export_json_lines());

    println!("\nThe handler is fixed; redriving:");
    fixed.store(true, Ordering::SeqCst);
    let redriven = dead.redrive_all()?;
    bus.flush(Duration::from_secs(10))?;
    println!("  {redriven} redriven, {} left in the ring", dead.len());

    let report = bus.shutdown()?;
    println!("\n{report}");
    if !(report.is_balanced() && dead.is_empty() && report.stats.dead_lettered == redriven as u64) {
        return Err("the retries and dead letters did not add up".into());
    }
    Ok(())
}

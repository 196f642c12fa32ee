//! A payment gateway goes down; the payments subscription's circuit breaker opens, its
//! deliveries park instead of burning their attempts, one delivery probes after each
//! cool-down, and once the gateway is back everything is charged, each order's events in
//! order — with nothing dead-lettered. The same outage without a breaker, for comparison.
//!
//! `cargo run --release --example circuit_breaker`

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use microbus::{
    Bus, CircuitBreaker, Context, Event, HandlerError, HandlerResult, Publish, RetryPolicy,
    SubscribeOptions,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PaymentRequested {
    order: u64,
    step: u32,
}
impl Event for PaymentRequested {
    const NAME: &'static str = "PaymentRequested";
}

const ORDERS: u64 = 100;
const STEPS: u32 = 5;
const OUTAGE: Duration = Duration::from_millis(300);

/// The gateway: down until `down` is cleared; what it charged, in the order it charged it.
#[derive(Default)]
struct Gateway {
    down: AtomicBool,
    calls: AtomicU64,
    charged: Mutex<Vec<(u64, u32)>>,
}

fn run(breaker: Option<CircuitBreaker>) -> Result<(), Box<dyn std::error::Error>> {
    let bus = Bus::builder()
        .service_name("checkout")
        .workers(2)
        // Four attempts, 20 ms apart: enough for a blip, not for a 300 ms outage.
        .retry(RetryPolicy::fixed(Duration::from_millis(20)).max_attempts(4))
        .build()?;
    let payments = bus.service("PaymentService")?;
    let gateway = Arc::new(Gateway::default());
    gateway.down.store(true, Ordering::SeqCst);
    let mut options = SubscribeOptions::new().named("charge");
    if let Some(breaker) = breaker {
        options = options.circuit_breaker(breaker.on_change(|change| println!("  {change}")));
    }
    {
        let gateway = gateway.clone();
        payments.subscribe_with(
            options,
            move |p: &PaymentRequested, _: &Context| -> HandlerResult {
                gateway.calls.fetch_add(1, Ordering::SeqCst);
                if gateway.down.load(Ordering::SeqCst) {
                    return Err(HandlerError::msg("gateway: 503 Service Unavailable"));
                }
                gateway.charged.lock().unwrap().push((p.order, p.step));
                Ok(())
            },
        )?;
    }
    let started = Instant::now();
    for step in 0..STEPS {
        for order in 0..ORDERS {
            bus.publish_with(PaymentRequested { order, step }, Publish::keyed(order))?;
        }
    }
    std::thread::sleep(OUTAGE);
    gateway.down.store(false, Ordering::SeqCst);
    println!("  gateway back after {:?}", started.elapsed());
    bus.flush(Duration::from_secs(30))?;
    let stats = bus.stats();
    let charged = gateway.charged.lock().unwrap();
    // Each order's steps in order: step k charged before step k + 1?
    let mut last = vec![None::<u32>; ORDERS as usize];
    let mut out_of_order = 0;
    for &(order, step) in charged.iter() {
        if last[order as usize].is_some_and(|l| l > step) {
            out_of_order += 1;
        }
        last[order as usize] = Some(step);
    }
    println!(
        "  {} payments: {} charged, {} dead-lettered, {} gateway calls, {} retries, {} charged \
         out of order, done in {:?}",
        stats.delivered,
        charged.len(),
        stats.dead_lettered,
        gateway.calls.load(Ordering::SeqCst),
        stats.retried,
        out_of_order,
        started.elapsed()
    );
    let metrics = bus.metrics();
    let opened: u64 = metrics.handlers.iter().map(|h| h.breaker_opened).sum();
    if opened > 0 {
        println!("  the breaker opened {opened} times");
    }
    drop(charged);
    bus.shutdown()?;
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!(
        "{} payments ({ORDERS} orders x {STEPS} steps), the gateway down for {OUTAGE:?}",
        ORDERS * u64::from(STEPS)
    );
    println!("\nwith a circuit breaker (3 failures in a row; 25 ms cool-down, doubling):");
    run(Some(
        CircuitBreaker::new(3, Duration::from_millis(25)).max_cool_down(Duration::from_millis(100)),
    ))?;
    println!("\nwithout one:");
    run(None)?;
    Ok(())
}

//! A CPU-bound batch job with rayon: score 1,000,000 orders in parallel, publish every score
//! through the bus with `publish_par_iter`, and let handlers aggregate them — a histogram of
//! scores, revenue per region, and a fraud check whose alerts are handled in turn. Prints the
//! throughput and checks the aggregates against a plain sequential computation.
//!
//! `cargo run --release --example rayon_pipeline [-- --orders N]`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use microbus::{Bus, Context, Event, HandlerResult};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderScored {
    order_id: u64,
    region: u8,
    total_cents: u64,
    score: u32,
}
impl Event for OrderScored {
    const NAME: &'static str = "OrderScored";
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FraudSuspected {
    order_id: u64,
    score: u32,
}
impl Event for FraudSuspected {
    const NAME: &'static str = "FraudSuspected";
}

const WORKERS: usize = 2;
const REGIONS: usize = 8;
const BUCKETS: usize = 10;
/// Scores at or above this are suspicious.
const SUSPICIOUS: u32 = 990;

/// The CPU-bound part: a risk score from 0 to 999 for an order, from a few hundred rounds of
/// mixing its fields (a stand-in for a model's arithmetic).
fn score(order_id: u64) -> OrderScored {
    let mut h = order_id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for round in 0..200u64 {
        h ^= h >> 29;
        h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9).wrapping_add(round);
    }
    OrderScored {
        order_id,
        region: (order_id % REGIONS as u64) as u8,
        total_cents: 500 + (h >> 40) % 50_000,
        score: (h % 1000) as u32,
    }
}

/// What the handlers add up, and what a sequential pass must agree with.
#[derive(Default)]
struct Totals {
    buckets: [AtomicU64; BUCKETS],
    revenue: [AtomicU64; REGIONS],
    suspected: AtomicU64,
    alerts: AtomicU64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let orders: u64 = args
        .iter()
        .position(|a| a == "--orders")
        .and_then(|i| args.get(i + 1))
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(1_000_000);

    let bus = Bus::builder()
        .service_name("scoring")
        .workers(WORKERS)
        .channel_capacity(1024)
        .build()?;
    let totals = Arc::new(Totals::default());

    let analytics = bus.service("analytics")?;
    {
        let totals = totals.clone();
        analytics.subscribe(move |e: &OrderScored, _: &Context| -> HandlerResult {
            totals.buckets[e.score as usize * BUCKETS / 1000].fetch_add(1, Ordering::Relaxed);
            totals.revenue[e.region as usize].fetch_add(e.total_cents, Ordering::Relaxed);
            Ok(())
        })?;
    }
    let fraud = bus.service("fraud")?;
    {
        let totals = totals.clone();
        fraud.subscribe(move |e: &OrderScored, ctx: &Context| -> HandlerResult {
            if e.score >= SUSPICIOUS {
                totals.suspected.fetch_add(1, Ordering::Relaxed);
                ctx.publish(FraudSuspected {
                    order_id: e.order_id,
                    score: e.score,
                })?;
            }
            Ok(())
        })?;
    }
    let notifications = bus.service("notifications")?;
    {
        let totals = totals.clone();
        notifications.subscribe_from(
            "fraud",
            move |_: &FraudSuspected, _: &Context| -> HandlerResult {
                totals.alerts.fetch_add(1, Ordering::Relaxed);
                Ok(())
            },
        )?;
    }

    println!(
        "scoring {orders} orders on {} rayon threads, handled by {WORKERS} bus workers",
        rayon::current_num_threads(),
    );
    let started = Instant::now();
    bus.publish_par_iter((0..orders).into_par_iter().map(score))?;
    let published = started.elapsed();
    bus.flush(Duration::from_secs(60))?;
    let handled = started.elapsed();
    println!(
        "scored and published in {published:.2?}, all handled in {handled:.2?}: {:.0} orders/s \
         ({:.0} deliveries/s)",
        orders as f64 / handled.as_secs_f64(),
        (2 * orders + totals.alerts.load(Ordering::Relaxed)) as f64 / handled.as_secs_f64(),
    );

    // The same aggregates, computed sequentially, must agree.
    let mut buckets = [0u64; BUCKETS];
    let mut revenue = [0u64; REGIONS];
    let mut suspected = 0u64;
    for e in (0..orders).map(score) {
        buckets[e.score as usize * BUCKETS / 1000] += 1;
        revenue[e.region as usize] += e.total_cents;
        suspected += u64::from(e.score >= SUSPICIOUS);
    }
    let load = |a: &[AtomicU64]| {
        a.iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect::<Vec<_>>()
    };
    assert_eq!(load(&totals.buckets), buckets, "score histogram");
    assert_eq!(load(&totals.revenue), revenue, "revenue per region");
    assert_eq!(totals.suspected.load(Ordering::Relaxed), suspected);
    assert_eq!(totals.alerts.load(Ordering::Relaxed), suspected);

    println!("scores by bucket of 100: {buckets:?}");
    for (region, cents) in revenue.iter().enumerate() {
        println!("  region {region}: {:>14.2}", *cents as f64 / 100.0);
    }
    println!("{suspected} orders suspected of fraud, {suspected} alerts handled");
    let report = bus.shutdown()?;
    assert!(report.is_balanced());
    println!(
        "bus: {} deliveries, {} succeeded, {} failed",
        report.stats.delivered, report.stats.succeeded, report.stats.failed
    );
    Ok(())
}

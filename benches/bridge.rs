//! The Redis bridge's throughput, as a table, next to what `redis-benchmark` reports for XADD
//! against the same server in the same run.
//!
//! Needs a redis-server: `.ci/redis cargo bench --features redis --bench bridge` starts a
//! throwaway one (or set `MICROBUS_REDIS_URL`). Rows:
//! - export: events published on one bus until every `XADD` is confirmed (`flush`), pipelined
//!   by the export thread;
//! - import: entries already in the stream read, published, handled and acknowledged by a
//!   second bus;
//! - round trip: export and import running at once, publish to handled;
//! - one XADD a round trip: a loop of plain `XADD`s on one connection, what an export without
//!   pipelining would cost;
//! - `redis-benchmark` XADD, 50 clients, then pipelined 64 deep (when the tool is installed).
//!
//! `MICROBUS_BRIDGE_EVENTS` sets the events per row (default 200,000);
//! `MICROBUS_BRIDGE_ROUNDS` how many times export and import take turns (default 3: each
//! reports its median).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use microbus::bridge::Bridge;
use microbus::{Bus, Context, Event, HandlerResult};
use serde::{Deserialize, Serialize};

const WAIT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderCreated {
    order_id: u64,
    total_cents: i64,
}
impl Event for OrderCreated {
    const NAME: &'static str = "OrderCreated";
}

fn rate(events: u64, took: Duration) -> f64 {
    events as f64 / took.as_secs_f64()
}

fn bus(service: &str) -> Bus {
    Bus::builder()
        .service_name(service)
        .workers(2)
        .build()
        .expect("a valid configuration")
}

/// A bus that counts the `OrderCreated` it handles, and a bridge importing them.
fn importing(url: &str, prefix: &str) -> (Bus, Bridge, Arc<AtomicU64>) {
    let payments = bus("payments");
    let handled = Arc::new(AtomicU64::new(0));
    let counted = handled.clone();
    payments
        .subscribe(move |_: &OrderCreated, _: &Context| -> HandlerResult {
            counted.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
        .expect("subscribed");
    let bridge = Bridge::connect(&payments, url, prefix).expect("connected");
    (payments, bridge, handled)
}

fn wait_for(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn publish_all(orders: &Bus, events: u64) {
    for order_id in 0..events {
        orders
            .publish(OrderCreated {
                order_id,
                total_cents: 4_200,
            })
            .expect("accepted");
    }
}

fn export(url: &str, prefix: &str, events: u64) -> f64 {
    let orders = bus("orders");
    let bridge = Bridge::connect(&orders, url, prefix).expect("connected");
    bridge.export::<OrderCreated>().expect("exported");
    let start = Instant::now();
    publish_all(&orders, events);
    orders.flush(WAIT).expect("flushed");
    let took = start.elapsed();
    assert_eq!(bridge.stats().exported, events);
    orders.shutdown().expect("shut down");
    rate(events, took)
}

fn import(url: &str, prefix: &str, events: u64) -> f64 {
    let (payments, bridge, handled) = importing(url, prefix);
    let start = Instant::now();
    bridge.import::<OrderCreated>("payments").expect("imported");
    wait_for("the import", || bridge.stats().acked >= events);
    let took = start.elapsed();
    assert_eq!(handled.load(Ordering::Relaxed), events);
    bridge.stop();
    payments.shutdown().expect("shut down");
    rate(events, took)
}

fn round_trip(url: &str, prefix: &str, events: u64) -> f64 {
    let (payments, importer, handled) = importing(url, prefix);
    importer
        .import::<OrderCreated>("payments")
        .expect("imported");
    let orders = bus("orders");
    let exporter = Bridge::connect(&orders, url, prefix).expect("connected");
    exporter.export::<OrderCreated>().expect("exported");
    let start = Instant::now();
    publish_all(&orders, events);
    wait_for("the round trip", || {
        handled.load(Ordering::Relaxed) >= events
    });
    let took = start.elapsed();
    orders.shutdown().expect("shut down");
    importer.stop();
    payments.shutdown().expect("shut down");
    rate(events, took)
}

/// The median of `rates`.
fn median(rates: &mut [f64]) -> f64 {
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

/// The size of the field `m` of the first entry of `stream`: one event's message.
fn message_size(url: &str, stream: &str) -> usize {
    let mut redis = redis::Client::open(url)
        .and_then(|c| c.get_connection())
        .expect("connected");
    let first: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query(&mut redis)
        .expect("read");
    first
        .ids
        .first()
        .and_then(|entry| entry.get::<Vec<u8>>("m"))
        .map_or(0, |m| m.len())
}

fn one_xadd_a_round_trip(url: &str, stream: &str, events: u64) -> f64 {
    use redis::Commands;
    let mut redis = redis::Client::open(url)
        .and_then(|c| c.get_connection())
        .expect("connected");
    let message = r#"{"wire":1,"event":"OrderCreated","version":1,"payload":{"order_id":1}}"#;
    let start = Instant::now();
    for _ in 0..events {
        let _: String = redis.xadd(stream, "*", &[("m", message)]).expect("added");
    }
    rate(events, start.elapsed())
}

/// `redis-benchmark`'s requests per second for XADD, `pipeline` deep; `None` when the tool is
/// not installed.
fn redis_benchmark(url: &str, stream: &str, events: u64, pipeline: u32) -> Option<f64> {
    let address = url.trim_start_matches("redis://");
    let (host, port) = address.split_once(':').unwrap_or((address, "6379"));
    let out = std::process::Command::new("redis-benchmark")
        .args([
            "-h",
            host,
            "-p",
            port.trim_end_matches('/'),
            "-q",
            "-c",
            "50",
        ])
        .args(["-n", &events.to_string(), "-P", &pipeline.to_string()])
        .args([
            "XADD",
            stream,
            "*",
            "m",
            "an-event-of-about-two-hundred-bytes",
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // Progress lines end in '\r'; the last says "XADD ...: 123456.79 requests per second, ...".
    let line = text
        .split(['\r', '\n'])
        .rev()
        .find(|l| l.contains(" requests per second"))?;
    let before = line.split(" requests per second").next()?;
    before.split_whitespace().last()?.parse().ok()
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this too: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let Ok(url) = std::env::var("MICROBUS_REDIS_URL") else {
        eprintln!(
            "the bridge bench needs a redis-server: run it as \
             `.ci/redis cargo bench --features redis --bench bridge`, or set MICROBUS_REDIS_URL"
        );
        std::process::exit(1);
    };
    let events: u64 = std::env::var("MICROBUS_BRIDGE_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let rounds: usize = std::env::var("MICROBUS_BRIDGE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let run = format!("bench-{}", std::process::id());
    // Export and import take turns, each round on a stream of its own, and each reports its
    // median: the machine's noise moves both alike.
    let mut exports = Vec::new();
    let mut imports = Vec::new();
    let mut size = 0;
    for round in 0..rounds {
        let prefix = format!("{run}-{round}");
        exports.push(export(&url, &prefix, events));
        size = message_size(&url, &format!("{prefix}:OrderCreated"));
        imports.push(import(&url, &prefix, events));
    }
    let export_rate = median(&mut exports);
    let import_rate = median(&mut imports);
    let trip = round_trip(&url, &format!("{run}-trip"), events);
    let single = one_xadd_a_round_trip(&url, &format!("{run}:single"), events / 10);
    let plain = redis_benchmark(&url, &format!("{run}:rb"), events, 1);
    let piped = redis_benchmark(&url, &format!("{run}:rb64"), events * 5, 64);

    println!(
        "Redis bridge, {events} events a row, events per second (export and import: the median \
         of {rounds} rounds); one message is {size} bytes"
    );
    println!("export rounds: {exports:.0?}; import rounds: {imports:.0?}");
    println!("{:<44}{:>14}", "row", "events/s");
    let row = |name: &str, value: Option<f64>| match value {
        Some(v) => println!("{name:<44}{v:>14.0}"),
        None => println!("{name:<44}{:>14}", "(no redis-benchmark)"),
    };
    row(
        "export, pipelined (publish to confirmed)",
        Some(export_rate),
    );
    row("import (read, handled, acknowledged)", Some(import_rate));
    row("round trip (publish to handled remotely)", Some(trip));
    row("one XADD a round trip, one connection", Some(single));
    row("redis-benchmark XADD, 50 clients", plain);
    row("redis-benchmark XADD, 50 clients, -P 64", piped);
    println!("import / export: {:.2}", import_rate / export_rate);
    if let Some(piped) = piped {
        println!(
            "export / redis-benchmark -P 64: {:.2}; export / one XADD a round trip: {:.1}",
            export_rate / piped,
            export_rate / single
        );
    }
    // Leave the server as it was.
    if let Ok(mut redis) = redis::Client::open(url.as_str()).and_then(|c| c.get_connection()) {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{run}*"))
            .query(&mut redis)
            .unwrap_or_default();
        for key in keys {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(key).query(&mut redis);
        }
    }
}

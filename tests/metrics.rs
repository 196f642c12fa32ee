//! Metrics: exact counters against a model, histogram counts against deliveries, the three
//! renderings, and metrics off.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{FollowUp, Keyed, Numbered, WAIT, hold_the_only_worker, quiet_worker_panics};
use microbus::{
    Bus, Context, HandlerError, HandlerResult, Latency, MetricsSnapshot, Publish, RetryPolicy,
};

const KEYS: u64 = 1000;

/// What the payment handler does with key `k`: how many attempts fail before one succeeds,
/// and whether the failure is permanent (no retry). With 3 attempts allowed, 3 failures
/// exhaust the retries.
fn plan(k: u64) -> (u32, bool) {
    if k.is_multiple_of(7) {
        (1, true)
    } else if k.is_multiple_of(5) {
        (2, false)
    } else if k.is_multiple_of(11) {
        (3, false)
    } else {
        (0, false)
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Expected {
    delivered: u64,
    succeeded: u64,
    failed: u64,
    panicked: u64,
    retried: u64,
    dead_lettered: u64,
}

/// A bus with three services and a mix of successes, retries, dead letters, panics, follow-ups
/// and events nobody hears, run to the end.
fn mixed_run(workers: usize, sample_every: u32) -> (Bus, MetricsSnapshot) {
    quiet_worker_panics();
    let bus = Bus::builder()
        .service_name("orders")
        .workers(workers)
        .retry(RetryPolicy::fixed(Duration::ZERO).max_attempts(3))
        .metrics_sample_every(sample_every)
        .build()
        .unwrap();
    let payments = bus.service("payments").unwrap();
    let shipping = bus.service("shipping").unwrap();
    payments
        .subscribe_with(
            microbus::SubscribeOptions::default()
                .named("charge")
                .from("orders"),
            |e: &Keyed, ctx: &Context| -> HandlerResult {
                let (failures, permanent) = plan(e.key);
                if ctx.attempt() <= failures {
                    let error = HandlerError::msg("card declined");
                    return Err(if permanent {
                        HandlerError::permanent(error)
                    } else {
                        error
                    });
                }
                ctx.publish(FollowUp {
                    parent: e.key,
                    index: 0,
                })?;
                Ok(())
            },
        )
        .unwrap();
    shipping
        .subscribe_with(
            microbus::SubscribeOptions::default().named("ship"),
            |_: &FollowUp, _: &Context| -> HandlerResult { Ok(()) },
        )
        .unwrap();
    shipping
        .subscribe_with(
            microbus::SubscribeOptions::default()
                .named("audit")
                .from("payments"),
            |e: &Numbered, ctx: &Context| -> HandlerResult {
                if e.seq.is_multiple_of(3) && ctx.attempt() == 1 {
                    panic!("audit log full");
                }
                Ok(())
            },
        )
        .unwrap();

    for key in 0..KEYS {
        bus.publish_with(Keyed { key, seq: key }, Publish::keyed(key))
            .unwrap();
    }
    for seq in 0..40 {
        // Nobody listens to `Numbered` from orders.
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    for seq in 0..30 {
        payments.publish(Numbered { publisher: 1, seq }).unwrap();
    }
    bus.flush(WAIT).unwrap();
    let snapshot = bus.metrics();
    (bus, snapshot)
}

fn expected_charge() -> Expected {
    let mut e = Expected::default();
    for k in 0..KEYS {
        e.delivered += 1;
        let (failures, permanent) = plan(k);
        let attempts = if permanent { 1 } else { (failures + 1).min(3) };
        let succeeded = !permanent && failures < 3;
        e.failed += u64::from(if succeeded { failures } else { attempts });
        if succeeded {
            e.succeeded += 1;
        } else {
            e.dead_lettered += 1;
        }
        e.retried += u64::from(if permanent { 0 } else { attempts - 1 });
    }
    e
}

fn counters(h: &microbus::HandlerMetrics) -> Expected {
    Expected {
        delivered: h.delivered,
        succeeded: h.succeeded,
        failed: h.failed,
        panicked: h.panicked,
        retried: h.retried,
        dead_lettered: h.dead_lettered,
    }
}

#[test]
fn counters_add_up_exactly_against_a_model() {
    let (bus, m) = mixed_run(2, 1);
    assert!(m.enabled);
    assert_eq!(m.sample_every, 1);
    assert!(m.workers_behind.is_empty(), "{:?}", m.workers_behind);

    let charge = expected_charge();
    assert_eq!(counters(m.handler("payments", "charge").unwrap()), charge);
    let ship = Expected {
        delivered: charge.succeeded,
        succeeded: charge.succeeded,
        ..Expected::default()
    };
    assert_eq!(counters(m.handler("shipping", "ship").unwrap()), ship);
    let audit = Expected {
        delivered: 30,
        succeeded: 30,
        failed: 10,
        panicked: 10,
        retried: 10,
        dead_lettered: 0,
    };
    assert_eq!(counters(m.handler("shipping", "audit").unwrap()), audit);

    let events: Vec<(&str, &str, u64, u64)> = m
        .events
        .iter()
        .map(|e| {
            (
                e.event.as_str(),
                e.source.as_str(),
                e.published,
                e.unmatched,
            )
        })
        .collect();
    assert_eq!(
        events,
        [
            ("FollowUp", "payments", charge.succeeded, 0),
            ("Keyed", "orders", KEYS, 0),
            ("Numbered", "orders", 40, 40),
            ("Numbered", "payments", 30, 0),
        ]
    );

    // The bus-wide ledger agrees with the per-handler figures.
    let s = &m.stats;
    assert_eq!(s.unmatched, 40);
    assert_eq!(
        s.succeeded,
        charge.succeeded + ship.succeeded + audit.succeeded
    );
    assert_eq!(s.failed, charge.failed + audit.failed);
    assert_eq!(s.retried, charge.retried + audit.retried);
    assert_eq!(s.dead_lettered, charge.dead_lettered);
    assert_eq!(m.dead_letters_held, charge.dead_lettered);
    assert_eq!(m.queue_depth, [0, 0]);
    assert_eq!(m.timer_pending, 0);
    bus.shutdown().unwrap();
}

#[test]
fn histogram_counts_equal_deliveries() {
    let (bus, m) = mixed_run(2, 1);
    for h in &m.handlers {
        let runs = h.succeeded + h.failed;
        assert_eq!(h.queue_wait.count, h.delivered, "{}", h.handler);
        assert_eq!(h.handler_time.count, runs, "{}", h.handler);
        assert_eq!(h.end_to_end.count, h.succeeded, "{}", h.handler);
        assert!(h.handler_time.min_ns <= h.handler_time.p50_ns);
        assert!(h.handler_time.p50_ns <= h.handler_time.p99_ns);
        assert!(h.handler_time.p99_ns <= h.handler_time.max_ns);
    }
    // Per event type: the handlers of the type merged.
    let numbered = m.event_latency.iter().find(|e| e.event == "Numbered");
    let audit = m.handler("shipping", "audit").unwrap();
    assert_eq!(numbered.unwrap().handler_time, audit.handler_time);
    let names: Vec<&str> = m.event_latency.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names, ["FollowUp", "Keyed", "Numbered"]);
    bus.shutdown().unwrap();
}

#[test]
fn sampled_latency_counts_one_delivery_in_n() {
    let bus = Bus::builder()
        .workers(1)
        .metrics_sample_every(4)
        .build()
        .unwrap();
    bus.subscribe(|_: &Numbered, _: &Context| -> HandlerResult { Ok(()) })
        .unwrap();
    for seq in 0..1001 {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    bus.flush(WAIT).unwrap();
    let m = bus.metrics();
    assert_eq!(m.sample_every, 4);
    let h = &m.handlers[0];
    // Counters stay exact; deliveries 0, 4, 8, … 1000 are timed.
    assert_eq!((h.delivered, h.succeeded), (1001, 1001));
    assert_eq!(h.handler_time.count, 251);
    assert_eq!(h.queue_wait.count, 251);
    assert_eq!(h.end_to_end.count, 251);
    assert!(m.to_string().contains("latency (1 delivery in 4)"));
    bus.shutdown().unwrap();
}

#[test]
fn percentiles_of_a_handler_that_sleeps_land_in_range() {
    const SLEEP: Duration = Duration::from_millis(3);
    let bus = Bus::builder()
        .workers(1)
        .metrics_sample_every(1)
        .build()
        .unwrap();
    bus.subscribe(|_: &Numbered, _: &Context| -> HandlerResult {
        std::thread::sleep(SLEEP);
        Ok(())
    })
    .unwrap();
    for seq in 0..20 {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    bus.flush(WAIT).unwrap();
    let h = bus.metrics().handlers[0].clone();
    let floor = SLEEP.as_nanos() as u64 * 99 / 100; // Histogram buckets are within 1%.
    let ceiling = Duration::from_secs(2).as_nanos() as u64;
    assert_eq!(h.handler_time.count, 20);
    assert!(h.handler_time.min_ns >= floor, "{:?}", h.handler_time);
    assert!(h.handler_time.p50_ns < ceiling, "{:?}", h.handler_time);
    assert!(h.handler_time.sum_ns >= 20 * SLEEP.as_nanos() as u64);
    // The last event waited for the 19 before it.
    assert!(h.queue_wait.max_ns >= 19 * floor, "{:?}", h.queue_wait);
    assert!(h.end_to_end.min_ns >= floor, "{:?}", h.end_to_end);
    assert!(h.end_to_end.max_ns >= h.queue_wait.max_ns);
    bus.shutdown().unwrap();
}

/// One parsed Prometheus sample: name and labels to value.
type Samples = BTreeMap<(String, BTreeMap<String, String>), f64>;

/// Parses text exposition: `# HELP`/`# TYPE` lines and `name{k="v",…} value` samples.
fn parse_prometheus(text: &str) -> (Samples, HashMap<String, String>) {
    let mut samples = Samples::new();
    let mut types = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            let previous = types.insert(name.to_owned(), kind.to_owned());
            assert!(previous.is_none(), "{name} has two TYPE lines");
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').unwrap();
                let mut labels = BTreeMap::new();
                let mut chars = body.chars().peekable();
                while chars.peek().is_some() {
                    let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
                    assert_eq!(chars.next(), Some('"'));
                    let mut value = String::new();
                    while let Some(c) = chars.next() {
                        match c {
                            '\\' => match chars.next().unwrap() {
                                'n' => value.push('\n'),
                                c => value.push(c),
                            },
                            '"' => break,
                            c => value.push(c),
                        }
                    }
                    labels.insert(key, value);
                    if chars.peek() == Some(&',') {
                        chars.next();
                    }
                }
                (name, labels)
            }
        };
        let family = ["_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|base| types.contains_key(*base))
            .unwrap_or(name);
        assert!(
            types.contains_key(family),
            "{name} has no TYPE line before it"
        );
        let previous = samples.insert((name.to_owned(), labels), value.parse().unwrap());
        assert!(previous.is_none(), "{line} appears twice");
    }
    (samples, types)
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn check_summary(samples: &Samples, name: &str, base: &[(&str, &str)], latency: &Latency) {
    for (quantile, ns) in [
        ("0.5", latency.p50_ns),
        ("0.9", latency.p90_ns),
        ("0.99", latency.p99_ns),
        ("0.999", latency.p999_ns),
    ] {
        let mut with = base.to_vec();
        with.push(("quantile", quantile));
        let seconds = samples[&(name.to_owned(), labels(&with))];
        assert!(
            (seconds * 1e9 - ns as f64).abs() < 0.5,
            "{name} {quantile}: {seconds} s against {ns} ns"
        );
    }
    let count = samples[&(format!("{name}_count"), labels(base))];
    assert_eq!(count, latency.count as f64, "{name}_count");
    let sum = samples[&(format!("{name}_sum"), labels(base))];
    assert!((sum * 1e9 - latency.sum_ns as f64).abs() <= latency.sum_ns as f64 * 1e-12 + 0.5);
}

#[test]
fn prometheus_exposition_parses_back_to_the_snapshot() {
    let (bus, m) = mixed_run(2, 1);
    let text = m.to_prometheus();
    let (samples, types) = parse_prometheus(&text);
    assert_eq!(types["microbus_handler_succeeded_total"], "counter");
    assert_eq!(types["microbus_handler_run_seconds"], "summary");
    assert_eq!(types["microbus_queue_depth"], "gauge");
    let get = |name: &str, pairs: &[(&str, &str)]| samples[&(name.to_owned(), labels(pairs))];

    for e in &m.events {
        let l = [("event", e.event.as_str()), ("service", e.source.as_str())];
        assert_eq!(
            get("microbus_events_published_total", &l),
            e.published as f64
        );
        assert_eq!(
            get("microbus_events_unmatched_total", &l),
            e.unmatched as f64
        );
    }
    for h in &m.handlers {
        let l = [
            ("event", h.event.as_str()),
            ("handler", h.handler.as_str()),
            ("service", h.service.as_str()),
        ];
        for (name, value) in [
            ("delivered", h.delivered),
            ("succeeded", h.succeeded),
            ("failed", h.failed),
            ("panicked", h.panicked),
            ("retried", h.retried),
            ("dead_lettered", h.dead_lettered),
            ("cancelled", h.cancelled),
        ] {
            let metric = format!("microbus_handler_{name}_total");
            assert_eq!(get(&metric, &l), value as f64, "{metric} {}", h.handler);
        }
        check_summary(
            &samples,
            "microbus_handler_queue_wait_seconds",
            &l,
            &h.queue_wait,
        );
        check_summary(
            &samples,
            "microbus_handler_run_seconds",
            &l,
            &h.handler_time,
        );
        check_summary(
            &samples,
            "microbus_handler_end_to_end_seconds",
            &l,
            &h.end_to_end,
        );
    }
    for e in &m.event_latency {
        let l = [("event", e.event.as_str())];
        check_summary(&samples, "microbus_event_run_seconds", &l, &e.handler_time);
        check_summary(
            &samples,
            "microbus_event_end_to_end_seconds",
            &l,
            &e.end_to_end,
        );
    }
    assert_eq!(
        get("microbus_bus_dead_lettered_total", &[]),
        m.stats.dead_lettered as f64
    );
    assert_eq!(
        get("microbus_dead_letters", &[]),
        m.dead_letters_held as f64
    );
    assert_eq!(get("microbus_queue_depth", &[("shard", "1")]), 0.0);
    assert_eq!(get("microbus_metrics_sample_every", &[]), 1.0);
    bus.shutdown().unwrap();
}

#[test]
fn json_round_trips() {
    let (bus, m) = mixed_run(2, 2);
    let json = m.to_json();
    let back: MetricsSnapshot = serde_json::from_str(&json).unwrap();
    assert_eq!(back, m);
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(value["sample_every"], 2);
    assert_eq!(value["handlers"][0]["handler"], "charge");
    assert!(
        value["handlers"][0]["handler_time"]["p99_ns"]
            .as_u64()
            .unwrap()
            > 0
    );
    bus.shutdown().unwrap();
}

#[test]
fn the_text_table_is_aligned_and_in_human_units() {
    let (bus, m) = mixed_run(1, 1);
    let text = m.to_string();
    for heading in ["events", "handlers", "latency (every delivery)"] {
        assert!(text.lines().any(|l| l == heading), "{heading} in\n{text}");
    }
    // In each table, the right edge of every numeric column lines up.
    let table: Vec<&str> = text
        .lines()
        .skip_while(|l| *l != "latency (every delivery)")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .collect();
    assert!(table.len() > 1 + 3 * m.handlers.len(), "{text}");
    let header = table[0];
    let p50_end = header.find("p50").unwrap() + 3;
    for line in &table[1..] {
        let cell = line.chars().nth(p50_end - 1).unwrap();
        assert_ne!(cell, ' ', "p50 column not aligned in {line:?}\n{text}");
        let value = line[..line.char_indices().nth(p50_end).unwrap().0]
            .split_whitespace()
            .last()
            .unwrap()
            .to_owned();
        assert!(
            value == "-" || ["ns", "µs", "ms", "s"].iter().any(|u| value.ends_with(u)),
            "{value} in {line:?}"
        );
    }
    assert!(text.contains("payments/charge"), "{text}");
    bus.shutdown().unwrap();
}

#[test]
fn with_metrics_off_the_snapshot_says_so_and_holds_no_latency() {
    let bus = Bus::builder().workers(2).metrics(false).build().unwrap();
    bus.subscribe(|_: &Numbered, _: &Context| -> HandlerResult { Ok(()) })
        .unwrap();
    for seq in 0..500 {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    bus.flush(WAIT).unwrap();
    let m = bus.metrics();
    assert!(!m.enabled);
    assert!(m.handlers.is_empty() && m.events.is_empty() && m.event_latency.is_empty());
    // The ledger is kept either way.
    assert_eq!(m.stats.succeeded, 500);
    assert!(m.to_string().contains("metrics are off"));
    let text = m.to_prometheus();
    assert!(!text.contains("microbus_handler_"), "{text}");
    assert!(!text.contains("_seconds"), "{text}");
    bus.shutdown().unwrap();
}

#[test]
fn a_busy_worker_is_named_and_caught_up_later() {
    let held = hold_the_only_worker(16);
    held.bus
        .publish(Numbered {
            publisher: 0,
            seq: 0,
        })
        .unwrap();
    held.entered.recv_timeout(WAIT).unwrap();
    let m = held.bus.metrics();
    assert_eq!(m.workers_behind, [0]);
    assert!(m.to_string().contains("busy in a handler"));
    held.release.send(()).unwrap();
    held.bus.flush(WAIT).unwrap();
    let m = held.bus.metrics();
    assert!(m.workers_behind.is_empty());
    assert_eq!(m.handlers[0].handler_time.count, 1);
    assert!(m.handlers[0].handler_time.min_ns > 0);
    held.bus.shutdown().unwrap();
}

#[test]
fn a_handler_may_read_the_metrics() {
    let bus = Bus::builder().workers(2).build().unwrap();
    let seen = Arc::new(AtomicU64::new(u64::MAX));
    let inner = bus.clone();
    {
        let seen = seen.clone();
        // Capturing the bus keeps it alive until shutdown; fine for a test.
        bus.subscribe(move |e: &Numbered, _: &Context| -> HandlerResult {
            if e.seq == 10 {
                let started = Instant::now();
                let m = inner.metrics();
                assert!(started.elapsed() < WAIT);
                seen.store(m.handlers[0].delivered, Ordering::SeqCst);
            }
            Ok(())
        })
        .unwrap();
    }
    for seq in 0..20 {
        bus.publish_with(Numbered { publisher: 0, seq }, Publish::keyed(1u64))
            .unwrap();
    }
    bus.flush(WAIT).unwrap();
    // Deliveries 0 to 10 had begun (keyed: one shard, in order).
    assert_eq!(seen.load(Ordering::SeqCst), 11);
    bus.shutdown().unwrap();
}

#[test]
fn an_ended_subscription_stays_in_the_metrics() {
    let bus = Bus::builder().workers(1).build().unwrap();
    let sub = bus
        .subscribe(|_: &Numbered, _: &Context| -> HandlerResult { Ok(()) })
        .unwrap();
    for seq in 0..10 {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    bus.flush(WAIT).unwrap();
    sub.unsubscribe();
    bus.publish(Numbered {
        publisher: 0,
        seq: 10,
    })
    .unwrap();
    let m = bus.metrics();
    let h = &m.handlers[0];
    assert!(!h.active);
    assert_eq!(h.delivered, 10);
    assert_eq!(m.events[0].published, 11);
    assert_eq!(m.events[0].unmatched, 1);
    assert!(m.to_string().contains("(ended)"));
    bus.shutdown().unwrap();
}

#[test]
fn publish_counts_from_many_threads_add_up() {
    let bus = Bus::builder().workers(2).build().unwrap();
    bus.subscribe(|_: &Numbered, _: &Context| -> HandlerResult { Ok(()) })
        .unwrap();
    // Threads come and go: later ones take over the slots of those that exited.
    for round in 0..3u32 {
        std::thread::scope(|s| {
            for publisher in 0..4u32 {
                let bus = &bus;
                s.spawn(move || {
                    for seq in 0..2_500 {
                        bus.publish(Numbered {
                            publisher: round * 4 + publisher,
                            seq,
                        })
                        .unwrap();
                    }
                });
            }
        });
    }
    bus.flush(WAIT).unwrap();
    let m = bus.metrics();
    assert_eq!(m.event("Numbered", "app").unwrap().published, 30_000);
    assert_eq!(m.handlers[0].delivered, 30_000);
    bus.shutdown().unwrap();
}

#[test]
fn events_that_were_not_published_after_all_are_not_counted() {
    let bus = Bus::builder()
        .workers(2)
        .retry(RetryPolicy::fixed(Duration::ZERO).max_attempts(2))
        .build()
        .unwrap();
    // The handler stages a follow-up and then fails on its first attempt: that follow-up is
    // dropped with the outbox, and only the second attempt's is published.
    bus.subscribe(|e: &Numbered, ctx: &Context| -> HandlerResult {
        ctx.publish(FollowUp {
            parent: e.seq,
            index: 0,
        })?;
        if ctx.attempt() == 1 {
            return Err(HandlerError::msg("not yet"));
        }
        Ok(())
    })
    .unwrap();
    bus.subscribe(|_: &FollowUp, _: &Context| -> HandlerResult { Ok(()) })
        .unwrap();
    for seq in 0..100 {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    bus.flush(WAIT).unwrap();
    bus.shutdown().unwrap();
    // Refused after shutdown: handed back, not counted.
    assert!(
        bus.publish(Numbered {
            publisher: 0,
            seq: 100
        })
        .is_err()
    );
    assert!(bus.publish(Keyed { key: 1, seq: 1 }).is_err());
    let m = bus.metrics();
    assert_eq!(m.event("Numbered", "app").unwrap().published, 100);
    assert_eq!(m.event("FollowUp", "app").unwrap().published, 100);
    assert_eq!(m.event("Keyed", "app").map_or(0, |e| e.published), 0);
    assert_eq!(m.handlers.iter().map(|h| h.succeeded).sum::<u64>(), 200);
}

/// Prometheus carries every term of the ledger: a scrape alone checks that the deliveries
/// accepted equal the sum of their outcomes, here with each kind of outcome present but
/// cancellations (succeeded, dead-lettered, abandoned at the shutdown deadline, left).
#[test]
fn a_prometheus_scrape_balances_the_ledger() {
    quiet_worker_panics();
    let bus = Bus::builder()
        .workers(1)
        .retry(microbus::RetryPolicy::none())
        .build()
        .unwrap();
    let (entered_tx, entered) = crossbeam_channel::bounded(1);
    let (release, release_rx) = crossbeam_channel::bounded::<()>(1);
    bus.subscribe(move |e: &Numbered, _: &Context| -> HandlerResult {
        match e.seq {
            0 => {
                entered_tx.send(()).unwrap();
                release_rx.recv().unwrap();
                Ok(())
            }
            seq if seq % 2 == 1 => Err(microbus::HandlerError::msg("odd")),
            _ => Ok(()),
        }
    })
    .unwrap();
    let publish = |seq| {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    };
    (1..=10).for_each(publish);
    bus.flush(WAIT).unwrap();
    (0..1).for_each(publish);
    entered.recv().unwrap();
    (11..=15).for_each(publish);
    let report = bus.shutdown_timeout(Duration::from_millis(50)).unwrap();
    release.send(()).unwrap();
    let (samples, types) = parse_prometheus(&bus.metrics().to_prometheus());
    let get = |name: &str| samples[&(name.to_owned(), labels(&[]))] as u64;
    assert_eq!(types["microbus_bus_left_total"], "counter");
    let outcomes = [
        "succeeded",
        "dead_lettered",
        "discarded",
        "cancelled",
        "abandoned",
        "left",
    ]
    .map(|term| get(&format!("microbus_bus_{term}_total")));
    let delivered = get("microbus_bus_delivered_total");
    assert_eq!(delivered, 16);
    assert_eq!(outcomes, [5, 5, 0, 0, 1, 5], "{report}");
    assert_eq!(
        delivered,
        outcomes.iter().sum::<u64>() + get("microbus_in_flight")
    );
    assert_eq!(
        (
            get("microbus_bus_failed_total"),
            get("microbus_bus_unmatched_total")
        ),
        (5, 0)
    );
}

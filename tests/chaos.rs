//! Chaos: 4 services, 8 subscriptions, keyed and unkeyed events, transient errors, permanent
//! errors, panics and slow handlers, follow-ups published by handlers, a subscription added and
//! removed while events flow, and a shutdown in the middle of the stream. At the end, a
//! Jepsen-style account of every delivery against what the handlers saw:
//!
//! - lost: an accepted delivery neither handled nor dead-lettered — must be 0 (the shutdown's
//!   deadline leaves time for everything accepted);
//! - unexpected: a handler saw an event that was never accepted — must be 0;
//! - duplicated or excess: a delivery that succeeded twice, or was tried more often than its
//!   failures called for — must be 0;
//! - order: first attempts of one publisher's events with one key reach each subscription in
//!   publish order. Retries run after the attempts that failed, so a retried event arrives
//!   after events published later; that is the documented exception, and the check looks at
//!   first attempts only;
//! - the `ShutdownReport` agrees with the handlers' own counts and with the dead letters.
//!
//! Shipping, audit and notifications run in lanes of their own (small channels), so events
//! fan out to several lanes and every check holds across them. While events flow, the
//! fraud check is paused and resumed at random, and a gateway behind a circuit breaker goes
//! down and comes back at random: its deliveries each succeed once or are dead-lettered. An
//! ordered subscription (the ledger) sees each publisher's events of a key in publish order
//! with every attempt.
//!
//! 200,000 events by default; `MICROBUS_CHAOS_EVENTS` sets another number (run it in release:
//! `MICROBUS_CHAOS_EVENTS=5000000 cargo test --release --test chaos`).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::quiet_worker_panics;
use microbus::{
    Bus, CircuitBreaker, Context, DeadLetterReason, Event, HandlerError, HandlerResult, Lane,
    Publish, RetryPolicy, SubscribeOptions, Subscription,
};
use serde::{Deserialize, Serialize};

fn events() -> u64 {
    std::env::var("MICROBUS_CHAOS_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000)
}

const KEYS: u64 = 64;
const MAX_ATTEMPTS: u32 = 3;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    id: u64,
    publisher: u32,
    key: u64,
    seq: u64,
}
impl Event for Order {
    const NAME: &'static str = "Order";
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Ping {
    id: u64,
}
impl Event for Ping {
    const NAME: &'static str = "Ping";
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Shipped {
    id: u64,
}
impl Event for Shipped {
    const NAME: &'static str = "Shipped";
}

/// The ordered subscription's calls, per (publisher, key): (seq, attempt, event id).
type LedgerCalls = HashMap<(u32, u64), Vec<(u64, u32, u64)>>;

/// What a handler does with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    Ok,
    Slow,
    /// Fails this many attempts, then succeeds.
    Transient(u32),
    PanicOnce,
    Permanent,
}

impl Plan {
    fn of(id: u64, sub: usize) -> Plan {
        let mut x = id.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ (sub as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x ^= x >> 31;
        x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^= x >> 29;
        match x % 1000 {
            0..=29 => Plan::Transient(1),
            30..=39 => Plan::Transient(2),
            40..=49 => Plan::PanicOnce,
            50..=54 => Plan::Permanent,
            55..=59 => Plan::Slow,
            _ => Plan::Ok,
        }
    }

    /// The attempts it needs in all.
    fn attempts(self) -> u32 {
        match self {
            Plan::Transient(n) => n + 1,
            Plan::PanicOnce => 2,
            _ => 1,
        }
    }
}

/// What one subscription saw, by event id.
struct Seen {
    attempts: Vec<AtomicU8>,
    successes: Vec<AtomicU8>,
    failed_attempts: AtomicU64,
    /// Order violations: first attempts that came after a later one of the same key.
    disorder: AtomicU64,
    last_seq: Mutex<HashMap<(u32, u64), u64>>,
    /// Calls that started after `unsubscribe` returned.
    after_unsubscribe: AtomicU64,
    unsubscribed: AtomicBool,
}

impl Seen {
    fn new(ids: usize) -> Arc<Seen> {
        Arc::new(Seen {
            attempts: (0..ids).map(|_| AtomicU8::new(0)).collect(),
            successes: (0..ids).map(|_| AtomicU8::new(0)).collect(),
            failed_attempts: AtomicU64::new(0),
            disorder: AtomicU64::new(0),
            last_seq: Mutex::new(HashMap::new()),
            after_unsubscribe: AtomicU64::new(0),
            unsubscribed: AtomicBool::new(false),
        })
    }

    /// Runs attempt `attempt` of event `id` for subscription `sub` by its plan.
    fn run(&self, sub: usize, id: u64, attempt: u32) -> HandlerResult {
        if self.unsubscribed.load(Ordering::SeqCst) {
            self.after_unsubscribe.fetch_add(1, Ordering::SeqCst);
        }
        self.attempts[id as usize].fetch_add(1, Ordering::SeqCst);
        let plan = Plan::of(id, sub);
        let outcome = match plan {
            Plan::Transient(n) if attempt <= n => Err(HandlerError::msg("transient")),
            Plan::Permanent => Err(HandlerError::permanent(HandlerError::msg("permanent"))),
            Plan::PanicOnce if attempt == 1 => {
                self.failed_attempts.fetch_add(1, Ordering::SeqCst);
                panic!("chaos");
            }
            Plan::Slow => {
                std::thread::sleep(Duration::from_micros(200));
                Ok(())
            }
            _ => Ok(()),
        };
        match outcome {
            Ok(()) => {
                self.successes[id as usize].fetch_add(1, Ordering::SeqCst);
            }
            Err(_) => {
                self.failed_attempts.fetch_add(1, Ordering::SeqCst);
            }
        }
        outcome
    }

    fn first_attempt_order(&self, order: &Order) {
        let mut last = self.last_seq.lock().unwrap();
        let previous = last.insert((order.publisher, order.key), order.seq);
        if previous.is_some_and(|p| p >= order.seq) {
            self.disorder.fetch_add(1, Ordering::SeqCst);
        }
    }
}

struct Sub {
    service: &'static str,
    handler: &'static str,
    seen: Arc<Seen>,
    /// Subscribed for the whole run.
    always: bool,
}

fn subscribe_orders(bus: &Bus, sub: usize, seen: &Arc<Seen>, handler: &str) -> Subscription {
    let seen = seen.clone();
    bus.subscribe_with(
        in_lane(
            SubscribeOptions::default().named(handler).from("orders"),
            bus,
        ),
        move |e: &Order, ctx: &Context| -> HandlerResult {
            if ctx.attempt() == 1 {
                seen.first_attempt_order(e);
            }
            seen.run(sub, e.id, ctx.attempt())?;
            if sub == 0 {
                // The payment handler ships what it charged: a follow-up from the outbox.
                ctx.publish(Shipped { id: e.id })?;
            }
            Ok(())
        },
    )
    .unwrap()
}

/// Each service but payments in a lane of its own: shipping on 2 workers, audit and
/// notifications on 1, with small channels.
fn in_lane(options: SubscribeOptions, service: &Bus) -> SubscribeOptions {
    match service.service_name() {
        "payments" | "orders" => options,
        lane => options.lane(lane),
    }
}

#[test]
fn chaos_accounts_for_every_delivery() {
    quiet_worker_panics();
    let total = events();
    let ids = total as usize;
    let bus = Bus::builder()
        .service_name("orders")
        .workers(4)
        .channel_capacity(64)
        .retry(RetryPolicy::fixed(Duration::from_millis(1)).max_attempts(MAX_ATTEMPTS))
        .dead_letter_capacity(1 << 22)
        .lane("shipping", Lane::new(2).channel_capacity(16))
        .lane("audit", Lane::new(1).channel_capacity(8))
        .lane("notifications", Lane::new(1).channel_capacity(32))
        .build()
        .unwrap();
    let payments = bus.service("payments").unwrap();
    let shipping = bus.service("shipping").unwrap();
    let audit = bus.service("audit").unwrap();
    let notifications = bus.service("notifications").unwrap();

    let names: [(&'static str, &'static str, bool); 10] = [
        ("payments", "charge", true),
        ("payments", "fraud-check", true),
        ("shipping", "label", true),
        ("audit", "log", true),
        ("audit", "ping-log", true),
        ("shipping", "ship", true),
        ("notifications", "notify", true),
        ("notifications", "late", false),
        ("payments", "gateway", true),
        ("audit", "ledger", true),
    ];
    let subs: Vec<Sub> = names
        .iter()
        .map(|&(service, handler, always)| Sub {
            service,
            handler,
            seen: Seen::new(ids),
            always,
        })
        .collect();
    subscribe_orders(&payments, 0, &subs[0].seen, "charge");
    let fraud_check = subscribe_orders(&payments, 1, &subs[1].seen, "fraud-check");
    subscribe_orders(&shipping, 2, &subs[2].seen, "label");
    subscribe_orders(&audit, 3, &subs[3].seen, "log");
    {
        let seen = subs[4].seen.clone();
        audit
            .subscribe_with(
                in_lane(SubscribeOptions::default().named("ping-log"), &audit),
                move |e: &Ping, ctx: &Context| seen.run(4, e.id, ctx.attempt()),
            )
            .unwrap();
    }
    for (sub, service) in [(5, &shipping), (6, &notifications)] {
        let seen = subs[sub].seen.clone();
        service
            .subscribe_with(
                in_lane(
                    SubscribeOptions::default()
                        .named(subs[sub].handler)
                        .from("payments"),
                    service,
                ),
                move |e: &Shipped, ctx: &Context| seen.run(sub, e.id, ctx.attempt()),
            )
            .unwrap();
    }

    // A gateway that goes down and comes back, behind a circuit breaker.
    const GATEWAY: usize = 8;
    let gateway_down = Arc::new(AtomicBool::new(false));
    {
        let (seen, down) = (subs[GATEWAY].seen.clone(), gateway_down.clone());
        payments
            .subscribe_with(
                SubscribeOptions::default()
                    .named("gateway")
                    .from("orders")
                    .circuit_breaker(
                        CircuitBreaker::new(3, Duration::from_millis(1))
                            .max_cool_down(Duration::from_millis(8)),
                    ),
                move |e: &Order, _: &Context| -> HandlerResult {
                    seen.attempts[e.id as usize].fetch_add(1, Ordering::SeqCst);
                    if down.load(Ordering::SeqCst) {
                        seen.failed_attempts.fetch_add(1, Ordering::SeqCst);
                        return Err(HandlerError::msg("gateway down"));
                    }
                    seen.successes[e.id as usize].fetch_add(1, Ordering::SeqCst);
                    Ok(())
                },
            )
            .unwrap();
    }

    // An ordered subscription: every call, per (publisher, key), as (seq, attempt, id).
    const LEDGER: usize = 9;
    let ledger_calls: Arc<Mutex<LedgerCalls>> = Arc::default();
    {
        let (seen, calls) = (subs[LEDGER].seen.clone(), ledger_calls.clone());
        audit
            .subscribe_with(
                in_lane(
                    SubscribeOptions::default()
                        .named("ledger")
                        .from("orders")
                        .ordered(),
                    &audit,
                ),
                move |e: &Order, ctx: &Context| -> HandlerResult {
                    calls
                        .lock()
                        .unwrap()
                        .entry((e.publisher, e.key))
                        .or_default()
                        .push((e.seq, ctx.attempt(), e.id));
                    if ctx.attempt() == 1 {
                        seen.first_attempt_order(e);
                    }
                    seen.run(LEDGER, e.id, ctx.attempt())
                },
            )
            .unwrap();
    }

    // Which ids were accepted, and of what type (true: an order).
    let accepted: Vec<AtomicU8> = (0..ids).map(|_| AtomicU8::new(0)).collect();
    let next_id = AtomicU64::new(0);
    let returned = AtomicU64::new(0);
    let late: Mutex<Option<Subscription>> = Mutex::new(None);
    let report = std::thread::scope(|s| {
        for publisher in 0..2u32 {
            let (bus, accepted, next_id, returned) = (&bus, &accepted, &next_id, &returned);
            s.spawn(move || {
                let mut seqs = vec![0u64; KEYS as usize];
                loop {
                    // Batches of 1 to 32 events, a quarter of them pings.
                    let n = 1 + (next_id.load(Ordering::Relaxed) % 32);
                    let start = next_id.fetch_add(n, Ordering::SeqCst);
                    if start >= total {
                        return;
                    }
                    let end = (start + n).min(total);
                    let mut orders = Vec::new();
                    for id in start..end {
                        if id % 4 == 3 {
                            match bus.publish(Ping { id }) {
                                Ok(_id) => accepted[id as usize].store(2, Ordering::SeqCst),
                                Err(_) => {
                                    returned.fetch_add(1, Ordering::SeqCst);
                                }
                            }
                            continue;
                        }
                        let key = id % KEYS;
                        seqs[key as usize] += 1;
                        let order = Order {
                            id,
                            publisher,
                            key,
                            seq: seqs[key as usize],
                        };
                        orders.push((order, Publish::keyed(key)));
                    }
                    let ids: Vec<u64> = orders.iter().map(|(o, _)| o.id).collect();
                    let back: HashSet<u64> = match bus.publish_batch_with(orders) {
                        Ok(()) => HashSet::new(),
                        Err(e) => e.into_events().into_iter().map(|o| o.id).collect(),
                    };
                    returned.fetch_add(back.len() as u64, Ordering::SeqCst);
                    for id in ids {
                        if !back.contains(&id) {
                            accepted[id as usize].store(1, Ordering::SeqCst);
                        }
                    }
                }
            });
        }
        // Midway a subscription comes and goes; near the end the bus shuts down.
        let at = |fraction: f64| {
            while (next_id.load(Ordering::SeqCst) as f64) < total as f64 * fraction {
                std::thread::yield_now();
            }
        };
        let reached =
            |fraction: f64| next_id.load(Ordering::SeqCst) as f64 >= total as f64 * fraction;
        // From 10% to 80% of the stream: pauses of the fraud check and gateway outages of a
        // few hundred microseconds to a few milliseconds, at random.
        let (fraud_check, gateway_down) = (&fraud_check, &gateway_down);
        s.spawn(move || {
            let mut x = 0x2545_f491_4f6c_dd1du64;
            let mut random = move |n: u64| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % n
            };
            while !reached(0.1) {
                std::thread::yield_now();
            }
            while !reached(0.8) {
                let pause = random(2) == 0;
                let outage = random(2) == 0;
                if pause {
                    fraud_check.pause();
                }
                gateway_down.store(outage, Ordering::SeqCst);
                std::thread::sleep(Duration::from_micros(200 + random(3_000)));
                fraud_check.resume();
                gateway_down.store(false, Ordering::SeqCst);
                std::thread::sleep(Duration::from_micros(200 + random(2_000)));
            }
        });
        at(0.4);
        *late.lock().unwrap() = Some(subscribe_orders(&notifications, 7, &subs[7].seen, "late"));
        at(0.6);
        let sub = late.lock().unwrap().take().unwrap();
        sub.unsubscribe();
        subs[7].seen.unsubscribed.store(true, Ordering::SeqCst);
        at(0.9);
        bus.shutdown_timeout(Duration::from_secs(20)).unwrap()
    });

    // Dead letters, by (subscription, event id).
    let mut dead: HashMap<(usize, u64), DeadLetterReason> = HashMap::new();
    for letter in bus.dead_letters().list() {
        let sub = subs
            .iter()
            .position(|s| s.service == letter.service() && s.handler == letter.handler())
            .unwrap();
        let payload: serde_json::Value = serde_json::from_str(letter.payload_json()).unwrap();
        let id = payload["id"].as_u64().unwrap();
        assert!(
            dead.insert((sub, id), letter.reason()).is_none(),
            "two dead letters for {sub}/{id}"
        );
    }

    let mut lost = 0u64;
    let mut unexpected = 0u64;
    let mut excess = 0u64;
    let mut handler_successes = 0u64;
    let mut handler_failures = 0u64;
    let mut shipped_accepted = 0u64;
    for (index, sub) in subs.iter().enumerate() {
        let seen = &sub.seen;
        handler_failures += seen.failed_attempts.load(Ordering::SeqCst);
        assert_eq!(
            seen.disorder.load(Ordering::SeqCst),
            0,
            "{} out of order",
            sub.handler
        );
        assert_eq!(
            seen.after_unsubscribe.load(Ordering::SeqCst),
            0,
            "{} ran after unsubscribe",
            sub.handler
        );
        for id in 0..total {
            let attempts = u32::from(seen.attempts[id as usize].load(Ordering::SeqCst));
            let successes = u64::from(seen.successes[id as usize].load(Ordering::SeqCst));
            handler_successes += successes;
            let plan = Plan::of(id, index);
            let gateway = index == GATEWAY;
            if successes > 1
                || (!gateway
                    && (attempts > plan.attempts()
                        || (successes == 1 && attempts != plan.attempts())))
            {
                excess += 1;
            }
            // Was this delivery accepted? Orders and pings by their publisher; shipments by
            // the charge that published them.
            let delivered = match index {
                0..=3 | 7 | GATEWAY | LEDGER => accepted[id as usize].load(Ordering::SeqCst) == 1,
                4 => accepted[id as usize].load(Ordering::SeqCst) == 2,
                _ => subs[0].seen.successes[id as usize].load(Ordering::SeqCst) == 1,
            };
            if index == 5 && delivered {
                shipped_accepted += 1;
            }
            if !delivered {
                if attempts > 0 {
                    unexpected += 1;
                }
                continue;
            }
            let settled = successes == 1 || dead.contains_key(&(index, id));
            if let Some(reason) = dead.get(&(index, id)) {
                let expected = match plan {
                    // Down too long for its attempts, or parked by the breaker at shutdown.
                    _ if gateway => matches!(
                        reason,
                        DeadLetterReason::RetriesExhausted | DeadLetterReason::Shutdown
                    ),
                    Plan::Permanent => *reason == DeadLetterReason::Permanent,
                    _ => *reason == DeadLetterReason::Shutdown && attempts < plan.attempts(),
                };
                assert!(
                    expected,
                    "{}/{id}: {reason:?} with plan {plan:?} after {attempts}",
                    sub.handler
                );
            }
            // `late` matched only the orders published while it was subscribed; its share is
            // checked through the report's totals.
            if !settled && sub.always {
                lost += 1;
            }
        }
    }
    let stats = &report.stats;
    println!(
        "chaos: {total} events, {} deliveries, {} succeeded, {} failed attempts, {} retried, \
         {} dead-lettered, {} cancelled, {} left, {} abandoned, {} handed back",
        stats.delivered,
        stats.succeeded,
        stats.failed,
        stats.retried,
        stats.dead_lettered,
        stats.cancelled,
        stats.left,
        stats.abandoned,
        returned.load(Ordering::SeqCst)
    );
    assert_eq!(
        unexpected, 0,
        "handlers saw events that were never accepted"
    );
    assert_eq!(
        excess, 0,
        "deliveries duplicated or tried beyond their failures"
    );
    assert!(report.is_balanced(), "{report}");
    assert!(report.lanes.iter().all(|l| l.is_balanced()), "{report}");
    // The deadline is generous: everything accepted ran, and every retry fell due before it.
    assert_eq!((stats.left, stats.abandoned), (0, 0), "{report}");
    assert_eq!(
        lost, 0,
        "accepted deliveries neither handled nor dead-lettered"
    );
    assert_eq!(stats.succeeded, handler_successes);
    assert_eq!(stats.failed, handler_failures);
    assert_eq!(stats.dead_lettered, dead.len() as u64);
    assert!(shipped_accepted > 0);
    // The ordered subscription: per publisher and key, every call in publish order — a seq
    // starts only once the one before it made its last attempt (succeeded, failed for good,
    // or ran out of attempts).
    let mut ledger_checked = 0;
    for ((publisher, key), calls) in ledger_calls.lock().unwrap().iter() {
        for pair in calls.windows(2) {
            let ((seq, attempt, id), (next_seq, next_attempt, _)) = (pair[0], pair[1]);
            let plan = Plan::of(id, LEDGER);
            let last = attempt >= plan.attempts().min(MAX_ATTEMPTS);
            let ok = if next_seq == seq {
                next_attempt == attempt + 1
            } else {
                next_seq > seq && next_attempt == 1 && last
            };
            assert!(
                ok,
                "ledger {publisher}/{key}: {:?} then {:?}",
                pair[0], pair[1]
            );
            ledger_checked += 1;
        }
    }
    assert!(ledger_checked > 1_000, "{ledger_checked}");
    // The outages happened, and the breaker opened.
    assert!(subs[GATEWAY].seen.failed_attempts.load(Ordering::SeqCst) > 0);
    let metrics = bus.metrics();
    let gateway = metrics.handlers.iter().find(|h| h.handler == "gateway");
    assert!(gateway.is_some_and(|g| g.breaker_opened > 0), "{metrics}");
}

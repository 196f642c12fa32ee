//! The Redis Streams bridge against a real `redis-server` on loopback, named by
//! `MICROBUS_REDIS_URL` (`.ci/run` starts one). Without it these tests fail and say so.
#![cfg(feature = "redis")]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::WAIT;
use microbus::bridge::{Bridge, ExportOptions};
use microbus::{Bus, Context, Envelope, Event, EventId, HandlerResult, Publish};
use serde::{Deserialize, Serialize};

/// A `payments` bus with `workers` workers whose handler records each order id it handles.
fn payments_recording(workers: usize) -> (Bus, Arc<Mutex<Vec<u64>>>) {
    let payments = Bus::builder()
        .service_name("payments")
        .workers(workers)
        .build()
        .unwrap();
    let handled: Arc<Mutex<Vec<u64>>> = Arc::default();
    {
        let handled = handled.clone();
        payments
            .subscribe(move |e: &OrderCreated, _: &Context| -> HandlerResult {
                handled.lock().unwrap().push(e.order_id);
                Ok(())
            })
            .unwrap();
    }
    (payments, handled)
}

fn redis_url() -> String {
    std::env::var("MICROBUS_REDIS_URL").expect(
        "these tests need a Redis server: set MICROBUS_REDIS_URL (for example \
         redis://127.0.0.1:6379), as .ci/run does",
    )
}

/// A key prefix of its own for each test run.
fn prefix(test: &str) -> String {
    format!("microbus-test:{test}:{}", EventId::new())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct OrderCreated {
    order_id: u64,
}
impl Event for OrderCreated {
    const NAME: &'static str = "OrderCreated";
}

#[test]
fn ten_thousand_events_cross_with_their_envelopes() {
    const EVENTS: u64 = 10_000;
    let url = redis_url();
    let prefix = prefix("round-trip");

    let orders = Bus::builder()
        .service_name("orders")
        .workers(2)
        .build()
        .unwrap();
    let sent: Arc<Mutex<HashMap<EventId, Envelope>>> = Arc::default();
    {
        let sent = sent.clone();
        orders.tap(move |t| {
            sent.lock()
                .unwrap()
                .insert(t.envelope().id(), t.envelope().clone());
        });
    }
    let exporter = Bridge::connect(&orders, &url, &prefix).unwrap();
    exporter.export::<OrderCreated>().unwrap();

    let payments = Bus::builder()
        .service_name("payments")
        .workers(2)
        .build()
        .unwrap();
    let received: Arc<Mutex<Vec<(u64, Envelope)>>> = Arc::default();
    {
        let received = received.clone();
        payments
            .subscribe(move |e: &OrderCreated, ctx: &Context| -> HandlerResult {
                received
                    .lock()
                    .unwrap()
                    .push((e.order_id, ctx.envelope().clone()));
                Ok(())
            })
            .unwrap();
    }
    let importer = Bridge::connect(&payments, &url, &prefix).unwrap();
    importer.import::<OrderCreated>("payments").unwrap();

    let started = Instant::now();
    for order_id in 0..EVENTS {
        orders
            .publish_with(
                OrderCreated { order_id },
                Publish::keyed(order_id % 16).header("tenant", "acme"),
            )
            .unwrap();
    }
    orders.flush(WAIT).unwrap();
    let exported_in = started.elapsed();
    while (received.lock().unwrap().len() as u64) < EVENTS && started.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(5));
    }
    let round_trip = started.elapsed();
    payments.flush(WAIT).unwrap();
    importer.stop();
    println!(
        "bridge: {EVENTS} events exported in {exported_in:?} ({:.0}/s), through in {round_trip:?} ({:.0}/s)",
        EVENTS as f64 / exported_in.as_secs_f64(),
        EVENTS as f64 / round_trip.as_secs_f64()
    );

    let received = received.lock().unwrap();
    let sent = sent.lock().unwrap();
    assert_eq!(received.len() as u64, EVENTS, "each event handled once");
    let mut seen = vec![false; EVENTS as usize];
    for (order_id, envelope) in received.iter() {
        assert!(!seen[*order_id as usize], "order {order_id} handled twice");
        seen[*order_id as usize] = true;
        assert_eq!(
            sent.get(&envelope.id()),
            Some(envelope),
            "the envelope crossed unchanged"
        );
    }
    assert_eq!(importer.stats().acked, EVENTS);
    assert_eq!(exporter.stats().exported, EVENTS);
    // The bus reports its bridges' counters in its metrics, for as long as they live.
    let metrics = orders.metrics();
    assert_eq!(metrics.bridges.len(), 1);
    assert_eq!(metrics.bridges[0].prefix, prefix);
    assert_eq!(metrics.bridges[0].exported, EVENTS);
    let exposition = metrics.to_prometheus();
    let line = format!("microbus_bridge_exported_total{{prefix=\"{prefix}\"}} {EVENTS}");
    assert!(
        exposition.lines().any(|l| l == line),
        "{line} in\n{exposition}"
    );
    assert!(metrics.to_string().contains("bridges"));
    // An import ends with its bridge (an export lives on as the subscription it is).
    assert_eq!(payments.metrics().bridges[0].acked, EVENTS);
    drop(importer);
    assert!(payments.metrics().bridges.is_empty());
    orders.shutdown().unwrap();
    payments.shutdown().unwrap();
}

#[test]
fn entries_that_do_not_decode_are_dead_lettered_with_their_raw_text_and_acknowledged() {
    use microbus::DeadLetterReason;
    use redis::Commands;
    let url = redis_url();
    let prefix = prefix("poison");
    let stream = format!("{prefix}:OrderCreated");
    let mut redis = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    // Not JSON; JSON of another version; and a good one after them.
    let good_envelope = {
        let bus = Bus::builder().service_name("orders").build().unwrap();
        let seen = Arc::new(Mutex::new(None));
        let put = seen.clone();
        bus.tap(move |t| *put.lock().unwrap() = Some(t.envelope().clone()));
        bus.publish(OrderCreated { order_id: 1 }).unwrap();
        let envelope = seen.lock().unwrap().take().unwrap();
        bus.shutdown().unwrap();
        envelope
    };
    let envelope_json = serde_json::to_string(&good_envelope).unwrap();
    let messages = [
        "not json at all".to_owned(),
        format!(
            r#"{{"wire":1,"event":"OrderCreated","version":2,"envelope":{envelope_json},"payload":{{"order_id":"two"}}}}"#
        ),
        format!(
            r#"{{"wire":1,"event":"OrderCreated","version":1,"envelope":{envelope_json},"payload":{{"order_id":3}}}}"#
        ),
    ];
    for m in &messages {
        let _: String = redis.xadd(&stream, "*", &[("m", m)]).unwrap();
    }

    let (payments, handled) = payments_recording(1);
    let bridge = Bridge::connect(&payments, &url, &prefix).unwrap();
    bridge.import::<OrderCreated>("payments").unwrap();
    let deadline = Instant::now() + WAIT;
    while bridge.stats().acked < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    bridge.stop();
    assert_eq!(*handled.lock().unwrap(), [3]);
    let stats = bridge.stats();
    assert_eq!(
        (stats.imported, stats.decode_failures, stats.acked),
        (1, 2, 3)
    );
    let letters = payments.dead_letters().list();
    assert_eq!(letters.len(), 2);
    for (letter, raw) in letters.iter().zip(&messages) {
        assert_eq!(letter.reason(), DeadLetterReason::Undecodable);
        assert_eq!(letter.handler(), "redis-import");
        let text: String = serde_json::from_str(letter.payload_json()).unwrap();
        assert_eq!(&text, raw, "the raw text is kept");
        assert!(letter.not_redrivable().is_some());
    }
    // The second message's envelope decoded and is kept; the first had none.
    assert_eq!(letters[1].envelope(), &good_envelope);
    // Nothing stays pending: every entry was acknowledged.
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg(&stream)
        .arg("payments")
        .query(&mut redis)
        .unwrap();
    let redis::Value::Array(summary) = pending else {
        panic!("{pending:?}")
    };
    assert_eq!(summary.first(), Some(&redis::Value::Int(0)), "{summary:?}");
    payments.shutdown().unwrap();
}

/// Set in the child process of the takeover test: the URL and key prefix to read from.
const CHILD: &str = "MICROBUS_BRIDGE_TAKEOVER_CHILD";

/// In the child process only: a consumer that reads entries and dies before acknowledging any
/// (its handler aborts the process).
#[test]
fn takeover_child() {
    let Ok(spec) = std::env::var(CHILD) else {
        return; // Run by the takeover test, in a process of its own.
    };
    let (url, prefix) = spec.split_once('|').unwrap();
    let bus = Bus::builder()
        .service_name("payments")
        .workers(1)
        .build()
        .unwrap();
    bus.subscribe(|_: &OrderCreated, _: &Context| -> HandlerResult {
        std::process::abort();
    })
    .unwrap();
    let bridge = Bridge::connect(&bus, url, prefix).unwrap();
    bridge.import::<OrderCreated>("payments").unwrap();
    std::thread::sleep(WAIT);
    unreachable!("the handler aborts the process");
}

/// What a takeover run saw: the orders handled, the entries the dead consumer left pending,
/// the bridge's counters, and the dead letters of the taking bus.
struct Takeover {
    handled: Vec<u64>,
    left_pending: u64,
    stats: microbus::bridge::BridgeStats,
    dead_letters: Vec<microbus::DeadLetter>,
    /// The taking bus, still running, and what its handler records.
    payments: Bus,
    recorded: Arc<Mutex<Vec<u64>>>,
}

/// Exports `events` orders, lets a child consumer read some and die, then imports with
/// `options` (claiming after 200 ms) until every entry was acknowledged.
fn take_over(test: &str, events: u64, options: microbus::bridge::ImportOptions) -> Takeover {
    use redis::Commands;
    let url = redis_url();
    let prefix = prefix(test);
    let orders = Bus::builder()
        .service_name("orders")
        .workers(1)
        .build()
        .unwrap();
    let exporter = Bridge::connect(&orders, &url, &prefix).unwrap();
    exporter.export::<OrderCreated>().unwrap();
    for order_id in 0..events {
        orders.publish(OrderCreated { order_id }).unwrap();
    }
    orders.flush(WAIT).unwrap();

    // A consumer reads a batch of entries and dies without acknowledging them.
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "takeover_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD, format!("{url}|{prefix}"))
        .status()
        .unwrap();
    assert!(!status.success(), "the child consumer was meant to die");
    let stream = format!("{prefix}:OrderCreated");
    let mut redis = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let pending = |redis: &mut redis::Connection| pending_entries(redis, &stream, "payments");
    let left_pending = pending(&mut redis);
    assert!(left_pending > 0, "the dead consumer left entries pending");

    let (payments, handled) = payments_recording(2);
    let bridge = Bridge::connect(&payments, &url, &prefix).unwrap();
    // Another consumer: a process started again under the dead one's name would read its
    // pending entries back instead (see the restart test).
    bridge
        .import_with::<OrderCreated>(
            options
                .consumer("taker")
                .claim_idle(Duration::from_millis(200)),
        )
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while (bridge.stats().acked < events || pending(&mut redis) > 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    bridge.stop();
    assert_eq!(pending(&mut redis), 0, "every entry was acknowledged");
    let _: () = redis.del(&stream).unwrap();
    let seen = handled.lock().unwrap().clone();
    let taken = Takeover {
        handled: seen,
        left_pending,
        stats: bridge.stats(),
        dead_letters: payments.dead_letters().list(),
        payments,
        recorded: handled,
    };
    orders.shutdown().unwrap();
    taken
}

#[test]
fn another_consumer_takes_over_what_a_dead_one_left_pending() {
    const EVENTS: u64 = 200;
    let taken = take_over(
        "takeover",
        EVENTS,
        microbus::bridge::ImportOptions::new("payments"),
    );
    let mut handled = taken.handled.clone();
    handled.sort_unstable();
    handled.dedup();
    assert_eq!(
        handled,
        (0..EVENTS).collect::<Vec<_>>(),
        "every order handled at least once"
    );
    assert_eq!(
        taken.stats.claimed, taken.left_pending,
        "exactly the unacknowledged entries were taken over"
    );
    assert!(taken.dead_letters.is_empty());
}

#[test]
fn entries_delivered_too_often_are_dead_lettered() {
    const EVENTS: u64 = 200;
    // The dead consumer's entries come back a second time: over a limit of one.
    let options = microbus::bridge::ImportOptions::new("payments").max_deliveries(1);
    let taken = take_over("poison", EVENTS, options);
    assert_eq!(taken.dead_letters.len() as u64, taken.left_pending);
    assert_eq!(taken.handled.len() as u64 + taken.left_pending, EVENTS);
    for letter in &taken.dead_letters {
        assert_eq!(
            letter.reason(),
            microbus::DeadLetterReason::RetriesExhausted
        );
        assert!(
            letter.errors()[0].contains("delivered 2 times"),
            "{:?}",
            letter.errors()
        );
        let raw: String = serde_json::from_str(letter.payload_json()).unwrap();
        assert!(raw.contains("\"wire\":1"), "the raw entry is kept: {raw}");
        assert_eq!(letter.not_redrivable(), None);
    }
    // They decode: a redrive publishes each into the bus, with its envelope, to the
    // subscriptions of its type.
    let before = taken.recorded.lock().unwrap().len() as u64;
    let redriven = taken.payments.dead_letters().redrive_all().unwrap();
    assert_eq!(redriven as u64, taken.left_pending);
    taken.payments.flush(WAIT).unwrap();
    let mut all = taken.recorded.lock().unwrap().clone();
    assert_eq!(all.len() as u64, before + taken.left_pending);
    all.sort_unstable();
    assert_eq!(
        all,
        (0..EVENTS).collect::<Vec<_>>(),
        "each order handled once"
    );
    assert!(taken.payments.dead_letters().is_empty());
    taken.payments.shutdown().unwrap();
}

/// A redis-server of the test's own, with its append-only file on, so that a restart keeps the
/// streams.
struct OwnServer {
    port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl OwnServer {
    fn start() -> OwnServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("microbus-redis-{port}-{}", EventId::new()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = OwnServer {
            port,
            dir,
            child: None,
        };
        server.run();
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn run(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is on the PATH (.ci/redis installs it)");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).unwrap();
        let deadline = Instant::now() + WAIT;
        while client.get_connection().is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server gracefully (it writes its append-only file) and waits for it.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_redis_restart_mid_stream_loses_nothing() {
    const EVENTS: u64 = 2_000;
    let _ = redis_url(); // Same precondition as the other tests: a redis-server to run.
    let mut server = OwnServer::start();
    let url = server.url();
    let prefix = prefix("restart");
    let orders = Bus::builder()
        .service_name("orders")
        .workers(1)
        .retry(microbus::RetryPolicy::fixed(Duration::from_millis(20)).max_attempts(500))
        .build()
        .unwrap();
    let exporter = Bridge::connect(&orders, &url, &prefix).unwrap();
    exporter.export::<OrderCreated>().unwrap();
    let (payments, handled) = payments_recording(1);
    let importer = Bridge::connect(&payments, &url, &prefix).unwrap();
    importer.import::<OrderCreated>("payments").unwrap();

    for order_id in 0..EVENTS {
        orders.publish(OrderCreated { order_id }).unwrap();
        if order_id == EVENTS / 2 {
            // Mid-stream: the server goes away for a moment and comes back with its data.
            server.stop();
            std::thread::sleep(Duration::from_millis(200));
            server.run();
        }
        if order_id % 100 == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    orders.flush(WAIT).unwrap();
    let deadline = Instant::now() + WAIT;
    while importer.stats().acked < EVENTS && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    importer.stop();
    let mut handled = handled.lock().unwrap().clone();
    handled.sort_unstable();
    handled.dedup();
    assert_eq!(handled, (0..EVENTS).collect::<Vec<_>>(), "nothing lost");
    assert!(exporter.stats().reconnects + importer.stats().reconnects > 0);
    assert!(orders.dead_letters().is_empty());
    orders.shutdown().unwrap();
    payments.shutdown().unwrap();
}

#[test]
fn import_threads_stop_with_the_bus() {
    use redis::Commands;
    let url = redis_url();
    let prefix = prefix("lifecycle");
    let stream = format!("{prefix}:OrderCreated");
    let (payments, handled) = payments_recording(1);
    let bridge = Bridge::connect(&payments, &url, &prefix).unwrap();
    bridge.import::<OrderCreated>("payments").unwrap();
    let mut redis = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let entry = |order_id: u64| -> String {
        let bus = Bus::builder().service_name("orders").build().unwrap();
        let seen = Arc::new(Mutex::new(None));
        let put = seen.clone();
        bus.tap(move |t| *put.lock().unwrap() = Some(t.envelope().clone()));
        bus.publish(OrderCreated { order_id }).unwrap();
        let envelope = seen.lock().unwrap().take().unwrap();
        bus.shutdown().unwrap();
        format!(
            r#"{{"wire":1,"event":"OrderCreated","version":1,"envelope":{},"payload":{{"order_id":{order_id}}}}}"#,
            serde_json::to_string(&envelope).unwrap()
        )
    };
    let _: String = redis.xadd(&stream, "*", &[("m", entry(1))]).unwrap();
    let deadline = Instant::now() + WAIT;
    while bridge.stats().acked < 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(*handled.lock().unwrap(), [1]);
    // The bus shuts down: the import thread stops reading, without `bridge.stop()`.
    payments.shutdown().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let _: String = redis.xadd(&stream, "*", &[("m", entry(2))]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // Another consumer of the group gets the new entry: nobody took it.
    let options = redis::streams::StreamReadOptions::default()
        .group("payments", "another")
        .count(10);
    let reply: redis::streams::StreamReadReply =
        redis.xread_options(&[&stream], &[">"], &options).unwrap();
    let entries: Vec<_> = reply.keys.into_iter().flat_map(|k| k.ids).collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(*handled.lock().unwrap(), [1]);
    assert_eq!(bridge.stats().imported, 1);
}

/// An export's delivery settles only when its `XADD` is confirmed: once `flush` returns, the
/// stream holds every event (the export thread sends them in pipelines, and flush waited for
/// each reply).
#[test]
fn flush_returns_once_every_export_is_confirmed() {
    use redis::Commands;
    const EVENTS: u64 = 5_000;
    let url = redis_url();
    let prefix = prefix("confirmed");
    let orders = Bus::builder()
        .service_name("orders")
        .workers(2)
        .build()
        .unwrap();
    let bridge = Bridge::connect(&orders, &url, &prefix).unwrap();
    bridge.export::<OrderCreated>().unwrap();
    for order_id in 0..EVENTS {
        orders.publish(OrderCreated { order_id }).unwrap();
    }
    orders.flush(WAIT).unwrap();
    let mut redis = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let len: u64 = redis.xlen(format!("{prefix}:OrderCreated")).unwrap();
    assert_eq!(len, EVENTS);
    assert_eq!(bridge.stats().exported, EVENTS);
    let stats = orders.stats();
    assert_eq!(
        (stats.succeeded, stats.failed, stats.in_flight),
        (EVENTS, 0, 0)
    );
    let _: () = redis.del(format!("{prefix}:OrderCreated")).unwrap();
}

/// With the server gone, each export fails, is retried by the bus and then dead-lettered with
/// the connection error: nothing hangs and nothing is lost.
#[test]
fn exports_to_a_server_that_is_gone_are_retried_then_dead_lettered() {
    const EVENTS: u64 = 50;
    let _ = redis_url(); // Same precondition as the other tests: a redis-server to run.
    let mut server = OwnServer::start();
    let orders = Bus::builder()
        .service_name("orders")
        .workers(1)
        .retry(microbus::RetryPolicy::fixed(Duration::from_millis(2)).max_attempts(3))
        .build()
        .unwrap();
    let bridge = Bridge::connect(&orders, &server.url(), &prefix("gone")).unwrap();
    bridge.export::<OrderCreated>().unwrap();
    server.stop();
    for order_id in 0..EVENTS {
        orders.publish(OrderCreated { order_id }).unwrap();
    }
    orders.flush(WAIT).unwrap();
    let letters = orders.dead_letters().list();
    assert_eq!(letters.len() as u64, EVENTS);
    let mut ids: Vec<u64> = letters
        .iter()
        .map(|l| {
            serde_json::from_str::<OrderCreated>(l.payload_json())
                .unwrap()
                .order_id
        })
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..EVENTS).collect::<Vec<_>>());
    assert!(letters.iter().all(|l| l.errors().len() == 3), "{letters:?}");
    let stats = orders.stats();
    assert_eq!((stats.failed, stats.retried), (3 * EVENTS, 2 * EVENTS));
    assert_eq!((stats.succeeded, stats.in_flight), (0, 0));
    assert_eq!(bridge.stats().exported, 0);
}

/// A server that accepts the connection and never answers: connecting gives up with an error
/// once the bridge's I/O timeouts (5 s a step) run out, instead of hanging.
#[test]
fn a_server_that_never_answers_is_an_error_not_a_hang() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://{}", listener.local_addr().unwrap());
    let (done, finished) = crossbeam_channel::bounded::<()>(1);
    let silent = std::thread::spawn(move || {
        // Holds the connection open, says nothing, until the test is over.
        let held = listener.accept().map(|(stream, _)| stream);
        let _ = finished.recv_timeout(WAIT);
        drop(held);
    });
    let bus = Bus::builder().build().unwrap();
    let started = Instant::now();
    let err = Bridge::connect(&bus, &url, &prefix("silent")).unwrap_err();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "{took:?}: {err}");
    done.send(()).unwrap();
    silent.join().unwrap();
    bus.shutdown().unwrap();
}

/// A test's own stream of orders: `events` of them already exported (numbered from 0) by an
/// orders bus that goes on exporting; the stream is deleted when it is dropped.
struct Exported {
    url: String,
    prefix: String,
    stream: String,
    orders: Bus,
    _exporter: Bridge,
}

impl Exported {
    /// The URL, key prefix, stream key and orders bus.
    fn parts(&self) -> (&str, &str, &str, &Bus) {
        (&self.url, &self.prefix, &self.stream, &self.orders)
    }
}

impl Drop for Exported {
    fn drop(&mut self) {
        use redis::Commands;
        let _: redis::RedisResult<()> = redis_connection(&self.url).del(&self.stream);
    }
}

fn exported_orders(test: &str, events: u64) -> Exported {
    let url = redis_url();
    let prefix = prefix(test);
    let stream = format!("{prefix}:OrderCreated");
    let (orders, exporter) = exported(&url, &prefix, 0, events);
    Exported {
        url,
        prefix,
        stream,
        orders,
        _exporter: exporter,
    }
}

/// An orders bus that exports `OrderCreated` to `prefix`, with `events` orders already in the
/// stream (numbered from `from`).
fn exported(url: &str, prefix: &str, from: u64, events: u64) -> (Bus, Bridge) {
    let orders = Bus::builder()
        .service_name("orders")
        .workers(2)
        .build()
        .unwrap();
    let bridge = Bridge::connect(&orders, url, prefix).unwrap();
    bridge.export::<OrderCreated>().unwrap();
    for order_id in from..from + events {
        orders.publish(OrderCreated { order_id }).unwrap();
    }
    orders.flush(WAIT).unwrap();
    (orders, bridge)
}

/// How many entries of `stream` group `group` has read and not acknowledged.
fn pending_entries(redis: &mut redis::Connection, stream: &str, group: &str) -> u64 {
    let summary: redis::Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query(redis)
        .unwrap();
    match summary {
        redis::Value::Array(fields) => match fields.first() {
            Some(redis::Value::Int(n)) => *n as u64,
            _ => panic!("{fields:?}"),
        },
        other => panic!("{other:?}"),
    }
}

fn redis_connection(url: &str) -> redis::Connection {
    redis::Client::open(url).unwrap().get_connection().unwrap()
}

/// Waits until `handled` holds `n` distinct orders (or the wait runs out); how many it holds.
fn wait_for_orders(handled: &Mutex<Vec<u64>>, n: usize, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let mut seen = handled.lock().unwrap().clone();
        seen.sort_unstable();
        seen.dedup();
        if seen.len() >= n || Instant::now() >= deadline {
            return seen.len();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Has consumer `consumer` of group `group` read `count` entries and leave them pending.
fn read_and_leave(redis: &mut redis::Connection, stream: &str, group: &str, consumer: &str) {
    use redis::Commands;
    let _: () = redis.xgroup_create_mkstream(stream, group, "0").unwrap();
    let options = redis::streams::StreamReadOptions::default()
        .group(group, consumer)
        .count(100_000);
    let _: redis::streams::StreamReadReply =
        redis.xread_options(&[stream], &[">"], &options).unwrap();
}

#[test]
fn an_import_whose_group_disappears_makes_it_again_and_goes_on() {
    use redis::Commands;
    let exported = exported_orders("nogroup", 10);
    let (url, prefix, stream, orders) = exported.parts();
    let (payments, handled) = payments_recording(2);
    let importer = Bridge::connect(&payments, url, prefix).unwrap();
    importer.import::<OrderCreated>("payments").unwrap();
    assert_eq!(wait_for_orders(&handled, 10, WAIT), 10);
    // The stream goes, group and all (as after a restart of a Redis without persistence).
    let _: () = redis_connection(url).del(stream).unwrap();
    for order_id in 10..1_010 {
        orders.publish(OrderCreated { order_id }).unwrap();
    }
    orders.flush(WAIT).unwrap();
    assert_eq!(wait_for_orders(&handled, 1_010, WAIT), 1_010);
    importer.stop();
    let stats = importer.stats();
    assert!(stats.group_recreations >= 1, "{stats:?}");
    assert!(
        stats.read_errors.get("NOGROUP").is_some_and(|&n| n >= 1),
        "{stats:?}"
    );
    let metrics = payments.metrics().to_prometheus();
    assert!(
        metrics.contains("microbus_bridge_group_recreations_total"),
        "{metrics}"
    );
    assert!(metrics.contains("kind=\"NOGROUP\""), "{metrics}");
    orders.shutdown().unwrap();
    payments.shutdown().unwrap();
}

#[test]
fn a_takeover_follows_the_claim_cursor_through_the_whole_pending_list() {
    const EVENTS: u64 = 1_089;
    let exported = exported_orders("cursor", EVENTS);
    let (url, prefix, stream, orders) = exported.parts();
    // A consumer took every entry and died.
    read_and_leave(&mut redis_connection(url), stream, "payments", "ghost");
    let (payments, handled) = payments_recording(2);
    let importer = Bridge::connect(&payments, url, prefix).unwrap();
    let claim_idle = Duration::from_secs(2);
    let started = Instant::now();
    importer
        .import_with::<OrderCreated>(
            microbus::bridge::ImportOptions::new("payments").claim_idle(claim_idle),
        )
        .unwrap();
    // One claim pass takes them all: within the claim time and a few seconds (64 entries a
    // pass, every half claim time, would take 17 s here).
    let taken = wait_for_orders(
        &handled,
        EVENTS as usize,
        claim_idle + Duration::from_secs(3),
    );
    let took = started.elapsed();
    println!("{EVENTS} pending entries taken over in {took:?}");
    assert_eq!(taken, EVENTS as usize, "after {took:?}");
    assert_eq!(importer.stats().claimed, EVENTS);
    importer.stop();
    orders.shutdown().unwrap();
    payments.shutdown().unwrap();
}

#[test]
fn a_slow_consumer_never_claims_its_own_entries() {
    use redis::Commands;
    const EVENTS: u64 = 100;
    let exported = exported_orders("own-claims", EVENTS);
    let (url, prefix, stream, orders) = exported.parts();
    // One worker, 20 ms an order: the last entries wait about 2 s, far past the claim time.
    let payments = Bus::builder()
        .service_name("payments")
        .workers(1)
        .build()
        .unwrap();
    let handled: Arc<Mutex<Vec<u64>>> = Arc::default();
    {
        let handled = handled.clone();
        payments
            .subscribe(move |e: &OrderCreated, _: &Context| -> HandlerResult {
                std::thread::sleep(Duration::from_millis(20));
                handled.lock().unwrap().push(e.order_id);
                Ok(())
            })
            .unwrap();
    }
    let importer = Bridge::connect(&payments, url, prefix).unwrap();
    importer
        .import_with::<OrderCreated>(
            microbus::bridge::ImportOptions::new("payments")
                .claim_idle(Duration::from_millis(300))
                .max_deliveries(1),
        )
        .unwrap();
    // The most deliveries any pending entry has had, watched while the orders run.
    let mut redis = redis_connection(url);
    let mut most = 0;
    let deadline = Instant::now() + WAIT;
    while handled.lock().unwrap().len() < EVENTS as usize && Instant::now() < deadline {
        let rows: redis::Value = redis::cmd("XPENDING")
            .arg(stream)
            .arg("payments")
            .arg("-")
            .arg("+")
            .arg(1_000)
            .query(&mut redis)
            .unwrap();
        if let redis::Value::Array(rows) = rows {
            for row in rows {
                if let redis::Value::Array(fields) = row
                    && let Some(redis::Value::Int(n)) = fields.get(3)
                {
                    most = most.max(*n);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    importer.stop();
    let mut seen = handled.lock().unwrap().clone();
    seen.sort_unstable();
    assert_eq!(seen, (0..EVENTS).collect::<Vec<_>>(), "each handled once");
    assert_eq!(most, 1, "an entry it held was counted as delivered again");
    assert!(payments.dead_letters().is_empty());
    assert_eq!(importer.stats().claimed, 0);
    let _: () = redis.del(stream).unwrap();
    orders.shutdown().unwrap();
    payments.shutdown().unwrap();
}

#[test]
fn a_consumer_started_again_under_its_name_reads_all_it_left_pending() {
    const EVENTS: u64 = 200;
    let exported = exported_orders("restart-name", EVENTS);
    let (url, prefix, stream, orders) = exported.parts();
    // The process that read them as `payments-1` stopped before acknowledging any.
    read_and_leave(&mut redis_connection(url), stream, "payments", "payments-1");
    let (payments, handled) = payments_recording(2);
    let importer = Bridge::connect(&payments, url, prefix).unwrap();
    importer
        .import_with::<OrderCreated>(
            microbus::bridge::ImportOptions::new("payments")
                .consumer("payments-1")
                // Not a takeover: its own pending list, every page of it (64 a page).
                .claim_idle(Duration::from_secs(3600)),
        )
        .unwrap();
    assert_eq!(
        wait_for_orders(&handled, EVENTS as usize, WAIT),
        EVENTS as usize
    );
    let deadline = Instant::now() + WAIT;
    while importer.stats().acked < EVENTS && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(importer.stats().acked, EVENTS);
    assert_eq!(importer.stats().claimed, 0);
    assert_eq!(handled.lock().unwrap().len() as u64, EVENTS, "none twice");
    importer.stop();
    orders.shutdown().unwrap();
    payments.shutdown().unwrap();
}

#[test]
fn an_import_reports_its_lag_pending_entries_and_their_age() {
    const EVENTS: u64 = 50;
    let exported = exported_orders("visibility", EVENTS);
    let (url, prefix, stream, orders) = exported.parts();
    // A handler that holds every order until released: all are delivered, none acknowledged.
    let payments = Bus::builder()
        .service_name("payments")
        .workers(1)
        .build()
        .unwrap();
    let (release, released) = crossbeam_channel::bounded::<()>(0);
    payments
        .subscribe(move |_: &OrderCreated, _: &Context| -> HandlerResult {
            let _ = released.recv();
            Ok(())
        })
        .unwrap();
    let importer = Bridge::connect(&payments, url, prefix).unwrap();
    importer
        .import_with::<OrderCreated>(
            microbus::bridge::ImportOptions::new("payments").consumer("payments-a"),
        )
        .unwrap();
    let deadline = Instant::now() + WAIT;
    let status = loop {
        let stats = importer.stats();
        let status = stats.imports[0].clone();
        if status.pending == EVENTS && status.oldest_pending_idle_ms >= 500 {
            break status;
        }
        assert!(Instant::now() < deadline, "{status:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.stream, stream);
    assert_eq!(
        (status.group.as_str(), status.consumer.as_str()),
        ("payments", "payments-a")
    );
    assert_eq!(
        status.lag,
        Some(0),
        "every entry was delivered to the group"
    );
    let snapshot = payments.metrics();
    let text = snapshot.to_prometheus();
    assert!(
        text.contains(&format!(
            "microbus_bridge_import_pending{{prefix=\"{prefix}\",stream=\"{stream}\",group=\"payments\"}} {EVENTS}"
        )),
        "{text}"
    );
    assert!(snapshot.to_string().contains("payments-a"));
    drop(release);
    importer.stop();
    orders.shutdown().unwrap();
    payments
        .shutdown_timeout(Duration::from_millis(100))
        .unwrap();
}

/// The envelope of an order published on a bus of its own.
fn an_envelope() -> Envelope {
    let bus = Bus::builder()
        .service_name("orders")
        .workers(1)
        .build()
        .unwrap();
    let (tx, rx) = crossbeam_channel::bounded(1);
    bus.tap(move |t| {
        let _ = tx.try_send(t.envelope().clone());
    });
    bus.publish(OrderCreated { order_id: 0 }).unwrap();
    let envelope = rx.recv_timeout(WAIT).unwrap();
    bus.shutdown().unwrap();
    envelope
}

/// `OrderCreated` at version 2: version 1 had no currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct OrderCreatedV2 {
    order_id: u64,
    currency: String,
}
impl Event for OrderCreatedV2 {
    const NAME: &'static str = "OrderCreated";
    const VERSION: u32 = 2;
}

#[test]
fn entries_of_an_older_version_are_upcast_on_import() {
    use redis::Commands;
    const EVENTS: u64 = 100;
    let exported = exported_orders("upcast", EVENTS);
    let (url, prefix, stream, orders) = exported.parts();
    // Version 1 of the orders service wrote these.
    // And one entry of a version nobody can read, and one the upcaster refuses.
    let mut redis = redis_connection(url);
    let envelope = serde_json::to_string(&an_envelope()).unwrap();
    for (version, payload) in [(3, r#"{"order_id":1000}"#), (1, r#"{"order":1001}"#)] {
        let entry = format!(
            r#"{{"wire":1,"event":"OrderCreated","version":{version},"envelope":{envelope},"payload":{payload}}}"#
        );
        let _: String = redis.xadd(stream, "*", &[("m", entry)]).unwrap();
    }
    // Version 2 of the payments service reads them.
    let payments = Bus::builder()
        .service_name("payments")
        .workers(2)
        .build()
        .unwrap();
    let handled: Arc<Mutex<Vec<OrderCreatedV2>>> = Arc::default();
    {
        let handled = handled.clone();
        payments
            .subscribe(move |e: &OrderCreatedV2, _: &Context| -> HandlerResult {
                handled.lock().unwrap().push(e.clone());
                Ok(())
            })
            .unwrap();
    }
    payments
        .upcast::<OrderCreatedV2>(1, |old| {
            let order_id = old["order_id"].as_u64().ok_or("no order_id")?;
            Ok(OrderCreatedV2 {
                order_id,
                currency: "EUR".to_owned(),
            })
        })
        .unwrap();
    assert_eq!(
        payments
            .upcast::<OrderCreatedV2>(2, |_| Err("same version".to_owned()))
            .unwrap_err()
            .field(),
        "upcast"
    );
    let importer = Bridge::connect(&payments, url, prefix).unwrap();
    importer.import::<OrderCreatedV2>("payments").unwrap();
    let deadline = Instant::now() + WAIT;
    while importer.stats().acked < EVENTS + 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    importer.stop();
    let mut handled = handled.lock().unwrap().clone();
    handled.sort_by_key(|e| e.order_id);
    assert_eq!(
        handled,
        (0..EVENTS)
            .map(|order_id| OrderCreatedV2 {
                order_id,
                currency: "EUR".to_owned()
            })
            .collect::<Vec<_>>()
    );
    let letters = payments.dead_letters().list();
    let mut errors: Vec<String> = letters.iter().map(|l| l.errors()[0].clone()).collect();
    errors.sort();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].contains("OrderCreated v1 does not upcast: no order_id"),
        "{errors:?}"
    );
    assert!(errors[1].contains("got OrderCreated v3"), "{errors:?}");
    assert!(
        letters
            .iter()
            .all(|l| l.reason() == microbus::DeadLetterReason::Undecodable)
    );
    let _: () = redis.del(stream).unwrap();
    orders.shutdown().unwrap();
    payments.shutdown().unwrap();
}

#[test]
fn dead_lettered_entries_outlive_a_restart_in_the_dead_letter_stream() {
    use redis::Commands;
    const EVENTS: u64 = 30;
    let exported = exported_orders("dead-stream", EVENTS);
    let (url, prefix, stream, orders) = exported.parts();
    let dead = format!("{stream}:dead");
    // Version 1 entries reach a version 2 consumer that has no upcaster yet.
    let v2_bus = || {
        let bus = Bus::builder()
            .service_name("payments")
            .workers(2)
            .build()
            .unwrap();
        let handled: Arc<Mutex<Vec<OrderCreatedV2>>> = Arc::default();
        {
            let handled = handled.clone();
            bus.subscribe(move |e: &OrderCreatedV2, _: &Context| -> HandlerResult {
                handled.lock().unwrap().push(e.clone());
                Ok(())
            })
            .unwrap();
        }
        (bus, handled)
    };
    let options = || microbus::bridge::ImportOptions::new("payments").dead_letter_stream(true);
    let mut redis = redis_connection(url);
    {
        let (bus, handled) = v2_bus();
        let bridge = Bridge::connect(&bus, url, prefix).unwrap();
        bridge.import_with::<OrderCreatedV2>(options()).unwrap();
        let deadline = Instant::now() + WAIT;
        while bridge.stats().acked < EVENTS && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        bridge.stop();
        assert!(handled.lock().unwrap().is_empty());
        assert_eq!(bridge.stats().dead_stream_writes, EVENTS);
        assert_eq!(bus.dead_letters().len() as u64, EVENTS);
        bus.shutdown().unwrap();
    }
    let kept: u64 = redis.xlen(&dead).unwrap();
    assert_eq!(kept, EVENTS);
    let first: redis::streams::StreamRangeReply = redis.xrange_count(&dead, "-", "+", 1).unwrap();
    let fields = &first.ids[0];
    assert_eq!(
        fields.get::<String>("reason").as_deref(),
        Some("undecodable")
    );
    assert_eq!(fields.get::<String>("group").as_deref(), Some("payments"));
    assert!(fields.get::<String>("m").unwrap().contains("\"version\":1"));

    // After the restart, with an upcaster: the dead letters go back on the stream.
    let (bus, handled) = v2_bus();
    bus.upcast::<OrderCreatedV2>(1, |old| {
        Ok(OrderCreatedV2 {
            order_id: old["order_id"].as_u64().ok_or("no order_id")?,
            currency: "EUR".to_owned(),
        })
    })
    .unwrap();
    let bridge = Bridge::connect(&bus, url, prefix).unwrap();
    bridge.import_with::<OrderCreatedV2>(options()).unwrap();
    assert_eq!(bridge.redrive_dead::<OrderCreatedV2>().unwrap(), EVENTS);
    let deadline = Instant::now() + WAIT;
    while (handled.lock().unwrap().len() as u64) < EVENTS && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    bridge.stop();
    let mut handled = handled.lock().unwrap().clone();
    handled.sort_by_key(|e| e.order_id);
    assert_eq!(handled.len() as u64, EVENTS);
    assert!(handled.iter().all(|e| e.currency == "EUR"));
    let left: u64 = redis.xlen(&dead).unwrap();
    assert_eq!(left, 0);
    assert_eq!(bridge.stats().dead_stream_redriven, EVENTS);
    let _: () = redis.del(&[stream, dead.as_str()]).unwrap();
    orders.shutdown().unwrap();
    bus.shutdown().unwrap();
}

#[test]
fn with_the_dedup_kept_in_redis_a_restarted_consumer_drops_what_was_handled() {
    use redis::Commands;
    const EVENTS: u64 = 20;
    let url = redis_url();
    let prefix = prefix("seen");
    let stream = format!("{prefix}:OrderCreated");
    let mut redis = redis_connection(&url);
    // Each order's entry, as an exporter wrote it; an export retried after a lost reply
    // writes the same event (same id) again.
    let entries: Vec<String> = (0..EVENTS)
        .map(|order_id| {
            format!(
                r#"{{"wire":1,"event":"OrderCreated","version":1,"envelope":{},"payload":{{"order_id":{order_id}}}}}"#,
                serde_json::to_string(&an_envelope()).unwrap()
            )
        })
        .collect();
    let run = |copies: &[String], dedup: bool| -> (Vec<u64>, u64) {
        let mut redis = redis_connection(&url);
        for entry in copies {
            let _: String = redis.xadd(&stream, "*", &[("m", entry)]).unwrap();
        }
        let (payments, handled) = payments_recording(2);
        let bridge = Bridge::connect(&payments, &url, &prefix).unwrap();
        let mut options = microbus::bridge::ImportOptions::new("payments");
        if dedup {
            options = options.dedup_in_redis(Duration::from_secs(60));
        }
        bridge.import_with::<OrderCreated>(options).unwrap();
        let deadline = Instant::now() + WAIT;
        while bridge.stats().acked < copies.len() as u64 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        bridge.stop();
        payments.shutdown().unwrap();
        let handled = handled.lock().unwrap().clone();
        (handled, bridge.stats().duplicates)
    };
    // A first process handles every order; a second one (a restart) reads each event again.
    let (first, _) = run(&entries, true);
    assert_eq!(first.len() as u64, EVENTS);
    let (again, duplicates) = run(&entries, true);
    assert_eq!(again, Vec::<u64>::new(), "nothing handled twice");
    assert_eq!(duplicates, EVENTS);
    // Without it, the restarted process has forgotten them (the in-memory window is empty).
    let (forgotten, _) = run(&entries[..5], false);
    assert_eq!(forgotten.len(), 5);
    let seen_keys: Vec<String> = redis.keys(format!("{stream}:seen:payments:*")).unwrap();
    assert_eq!(seen_keys.len() as u64, EVENTS);
    let ttl: i64 = redis.pttl(&seen_keys[0]).unwrap();
    assert!(ttl > 0 && ttl <= 60_000, "{ttl}");
    let _: () = redis.del(&stream).unwrap();
    let _: () = redis.del(seen_keys).unwrap();
}

#[test]
fn entries_trimmed_before_a_slow_group_read_them_are_counted_exactly() {
    use redis::Commands;
    const EVENTS: u64 = 3_000;
    let url = redis_url();
    let prefix = prefix("maxlen");
    let stream = format!("{prefix}:OrderCreated");
    // A consumer that stops reading: its one worker is held, its shard holds 4 events.
    let payments = Bus::builder()
        .service_name("payments")
        .workers(1)
        .channel_capacity(4)
        .build()
        .unwrap();
    let handled: Arc<Mutex<Vec<u64>>> = Arc::default();
    let (release, released) = crossbeam_channel::bounded::<()>(0);
    {
        let handled = handled.clone();
        payments
            .subscribe(move |e: &OrderCreated, _: &Context| -> HandlerResult {
                if e.order_id == 0 {
                    let _ = released.recv();
                }
                handled.lock().unwrap().push(e.order_id);
                Ok(())
            })
            .unwrap();
    }
    let importer = Bridge::connect(&payments, &url, &prefix).unwrap();
    importer.import::<OrderCreated>("payments").unwrap();
    // The exporter keeps about the last 100 entries.
    let orders = Bus::builder()
        .service_name("orders")
        .workers(1)
        .build()
        .unwrap();
    let exporter = Bridge::connect(&orders, &url, &prefix).unwrap();
    exporter
        .export_with::<OrderCreated>(microbus::bridge::ExportOptions::new().max_len(100))
        .unwrap();
    for order_id in 0..EVENTS {
        orders.publish(OrderCreated { order_id }).unwrap();
    }
    orders.flush(WAIT).unwrap();
    let len: u64 = redis_connection(&url).xlen(&stream).unwrap();
    assert!(len < 500, "the stream is bounded: {len}");
    drop(release);
    // Every entry was either read and handled, or trimmed before the group read it.
    let deadline = Instant::now() + WAIT;
    let (handled_n, trimmed) = loop {
        let handled_n = handled.lock().unwrap().len() as u64;
        let trimmed = importer.stats().imports[0].trimmed_unread;
        if handled_n + trimmed == EVENTS && importer.stats().acked == handled_n {
            break (handled_n, trimmed);
        }
        assert!(
            Instant::now() < deadline,
            "handled {handled_n}, trimmed {trimmed}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    println!("{handled_n} handled, {trimmed} lost to trimming");
    assert!(trimmed > 0);
    let mut seen = handled.lock().unwrap().clone();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len() as u64, handled_n, "none twice");
    importer.stop();
    let _: () = redis_connection(&url).del(&stream).unwrap();
    orders.shutdown().unwrap();
    payments.shutdown().unwrap();
}

#[test]
fn consumer_names_are_stable_per_host_and_service_and_leased() {
    use redis::Commands;
    let url = redis_url();
    let prefix = prefix("names");
    let stream = format!("{prefix}:OrderCreated");
    let import = |options: microbus::bridge::ImportOptions| {
        let (bus, handled) = payments_recording(1);
        let bridge = Bridge::connect(&bus, &url, &prefix).unwrap();
        bridge.import_with::<OrderCreated>(options).unwrap();
        let name = bridge.stats().imports[0].consumer.clone();
        (bus, bridge, handled, name)
    };
    let options = || microbus::bridge::ImportOptions::new("payments");
    let (a_bus, a, _, a_name) = import(options());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(a_name, format!("{}-payments", host.trim()));
    // A second replica on the same host does not share the name: it waits one lease for it,
    // then takes the next.
    let (b_bus, b, _, b_name) = import(options());
    assert_eq!(b_name, format!("{a_name}-2"));
    // Stopped, the first lets its name go: started again, it gets it back at once.
    a.stop();
    a_bus.shutdown().unwrap();
    let started = Instant::now();
    let (c_bus, c, _, c_name) = import(options());
    assert_eq!(c_name, a_name);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    // A consumer long gone, with nothing pending, is removed from its group; one holding
    // entries is not (a group of its own here, so that no other import reads them).
    let mut redis = redis_connection(&url);
    let _: () = redis.xgroup_create_mkstream(&stream, "audit", "$").unwrap();
    // (A consumer exists once it was given an entry.)
    let read = |redis: &mut redis::Connection, consumer: &str| -> String {
        let _: String = redis.xadd(&stream, "*", &[("m", "an entry")]).unwrap();
        let options = redis::streams::StreamReadOptions::default()
            .group("audit", consumer)
            .count(1);
        let reply: redis::streams::StreamReadReply =
            redis.xread_options(&[&stream], &[">"], &options).unwrap();
        reply.keys[0].ids[0].id.clone()
    };
    let id = read(&mut redis, "gone-empty");
    let _: u64 = redis.xack(&stream, "audit", &[id]).unwrap();
    read(&mut redis, "gone-holding");
    let (d_bus, d, _, _) = import(
        microbus::bridge::ImportOptions::new("audit")
            .consumer("sweeper")
            .claim_idle(Duration::from_secs(3600))
            .remove_idle_consumers(Duration::from_millis(200)),
    );
    let deadline = Instant::now() + WAIT;
    let names = loop {
        let consumers: redis::streams::StreamInfoConsumersReply =
            redis.xinfo_consumers(&stream, "audit").unwrap();
        let names: Vec<String> = consumers.consumers.into_iter().map(|c| c.name).collect();
        if !names.iter().any(|n| n == "gone-empty") || Instant::now() >= deadline {
            break names;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!names.iter().any(|n| n == "gone-empty"), "{names:?}");
    assert!(names.iter().any(|n| n == "gone-holding"), "{names:?}");
    assert_eq!(d.stats().consumers_removed, 1);
    for (bridge, bus) in [(b, b_bus), (c, c_bus), (d, d_bus)] {
        bridge.stop();
        bus.shutdown().unwrap();
    }
    let _: () = redis.del(&stream).unwrap();
}

const DEDUP_CHILD: &str = "MICROBUS_BRIDGE_DEDUP_CHILD";

/// A consumer that records each order it handles in the Redis list `<prefix>:handled` and dies
/// in the middle of the stream (run by the test below, in a process of its own).
#[test]
fn dedup_child() {
    use redis::Commands;
    let Ok(spec) = std::env::var(DEDUP_CHILD) else {
        return;
    };
    let (url, prefix) = spec.split_once('|').unwrap();
    let bus = Bus::builder()
        .service_name("payments")
        .workers(2)
        .build()
        .unwrap();
    let redis = Mutex::new(redis_connection(url));
    let list = format!("{prefix}:handled");
    let count = std::sync::atomic::AtomicU64::new(0);
    bus.subscribe(move |e: &OrderCreated, _: &Context| -> HandlerResult {
        let _: u64 = redis.lock().unwrap().rpush(&list, e.order_id).unwrap();
        if count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 500 {
            std::process::abort();
        }
        Ok(())
    })
    .unwrap();
    let bridge = Bridge::connect(&bus, url, prefix).unwrap();
    bridge
        .import_with::<OrderCreated>(
            microbus::bridge::ImportOptions::new("payments")
                .consumer("victim")
                .dedup_in_redis(Duration::from_secs(60)),
        )
        .unwrap();
    std::thread::sleep(WAIT);
    unreachable!("the handler aborts the process");
}

#[test]
fn with_the_dedup_kept_in_redis_a_killed_consumer_causes_duplicates_only_in_flight() {
    use redis::Commands;
    const EVENTS: u64 = 2_000;
    let exported = exported_orders("kill", EVENTS);
    let (url, prefix, stream, orders) = exported.parts();
    let list = format!("{prefix}:handled");
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "dedup_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(DEDUP_CHILD, format!("{url}|{prefix}"))
        .status()
        .unwrap();
    assert!(!status.success(), "the consumer was meant to die");
    let mut redis = redis_connection(url);
    // What it had read and not acknowledged when it died.
    let in_flight: u64 = match redis::cmd("XPENDING")
        .arg(stream)
        .arg("payments")
        .query::<redis::Value>(&mut redis)
        .unwrap()
    {
        redis::Value::Array(fields) => match fields.first() {
            Some(redis::Value::Int(n)) => *n as u64,
            _ => 0,
        },
        _ => 0,
    };
    let (payments, handled) = payments_recording(2);
    let bridge = Bridge::connect(&payments, url, prefix).unwrap();
    bridge
        .import_with::<OrderCreated>(
            microbus::bridge::ImportOptions::new("payments")
                .consumer("survivor")
                .claim_idle(Duration::from_millis(200))
                .dedup_in_redis(Duration::from_secs(60)),
        )
        .unwrap();
    let by_child: Vec<u64> = redis.lrange(&list, 0, -1).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let mut all: Vec<u64> = handled.lock().unwrap().clone();
        all.extend(&by_child);
        all.sort_unstable();
        all.dedup();
        let pending: redis::Value = redis::cmd("XPENDING")
            .arg(stream)
            .arg("payments")
            .query(&mut redis)
            .unwrap();
        let idle =
            matches!(&pending, redis::Value::Array(f) if f.first() == Some(&redis::Value::Int(0)));
        if all.len() as u64 == EVENTS && idle {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {EVENTS} handled",
            all.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    bridge.stop();
    let by_survivor = handled.lock().unwrap().clone();
    let total = (by_child.len() + by_survivor.len()) as u64;
    let duplicates = total - EVENTS;
    println!(
        "killed with {in_flight} entries in flight: {} handled before, {} after, {duplicates} twice",
        by_child.len(),
        by_survivor.len()
    );
    assert!(
        duplicates <= in_flight,
        "{duplicates} duplicates, {in_flight} in flight"
    );
    let _: () = redis.del(&[stream, list.as_str()]).unwrap();
    orders.shutdown().unwrap();
    payments.shutdown().unwrap();
}

/// An orders bus exporting `OrderCreated` with `options` while its stream is out of order:
/// the stream key holds a string, so every `XADD` fails (`WRONGTYPE`) until `mend`.
struct Outage {
    redis: redis::Connection,
    stream: String,
    orders: Bus,
    _bridge: Bridge,
}

impl Outage {
    fn start(test: &str, retry: microbus::RetryPolicy, options: ExportOptions) -> Outage {
        use redis::Commands;
        let url = redis_url();
        let prefix = prefix(test);
        let stream = format!("{prefix}:OrderCreated");
        let mut redis = redis_connection(&url);
        let orders = Bus::builder()
            .service_name("orders")
            .workers(2)
            .retry(retry)
            .build()
            .unwrap();
        let bridge = Bridge::connect(&orders, &url, &prefix).unwrap();
        bridge.export_with::<OrderCreated>(options).unwrap();
        let _: () = redis.set(&stream, "not a stream").unwrap();
        Outage {
            redis,
            stream,
            orders,
            _bridge: bridge,
        }
    }

    fn publish(&self, order_id: u64, keys: u64) {
        self.orders
            .publish_with(OrderCreated { order_id }, Publish::keyed(order_id % keys))
            .unwrap();
    }

    /// Ends the outage after `after`.
    fn mend(&mut self, after: Duration) {
        use redis::Commands;
        std::thread::sleep(after);
        let _: () = self.redis.del(&self.stream).unwrap();
    }

    /// Each key's order ids as the stream holds them (the first copy of each event), and how
    /// many entries it holds; deletes the stream.
    fn on_stream(&mut self, keys: u64) -> (HashMap<u64, Vec<u64>>, usize) {
        use redis::Commands;
        let entries: redis::streams::StreamRangeReply =
            self.redis.xrange_all(&self.stream).unwrap();
        let _: () = self.redis.del(&self.stream).unwrap();
        let mut seen = std::collections::HashSet::new();
        let mut by_key: HashMap<u64, Vec<u64>> = HashMap::new();
        for entry in &entries.ids {
            let m: Vec<u8> = entry.get("m").unwrap();
            let wire: serde_json::Value = serde_json::from_slice(&m).unwrap();
            if seen.insert(wire["envelope"]["id"].as_str().unwrap().to_owned()) {
                let order_id = wire["payload"]["order_id"].as_u64().unwrap();
                by_key.entry(order_id % keys).or_default().push(order_id);
            }
        }
        (by_key, entries.ids.len())
    }
}

/// Exports 8 keys × 40 orders through an outage: the first half is published and retried
/// every 30 ms while every `XADD` fails, then after 150 ms the stream is mended and the second
/// half published at once. Returns each key's order ids as the stream holds them, and how
/// many attempts failed.
fn export_through_an_outage(test: &str, options: ExportOptions) -> (HashMap<u64, Vec<u64>>, u64) {
    const KEYS: u64 = 8;
    const EVENTS: u64 = 320;
    let retry = microbus::RetryPolicy::fixed(Duration::from_millis(30)).max_attempts(1_000);
    let mut outage = Outage::start(test, retry, options);
    (0..EVENTS / 2).for_each(|id| outage.publish(id, KEYS));
    outage.mend(Duration::from_millis(150));
    (EVENTS / 2..EVENTS).for_each(|id| outage.publish(id, KEYS));
    outage.orders.flush(WAIT).unwrap();
    let stats = outage.orders.stats();
    assert_eq!((stats.succeeded, stats.in_flight), (EVENTS, 0), "{stats:?}");
    assert!(stats.failed > 0, "{stats:?}");
    let (by_key, _) = outage.on_stream(KEYS);
    assert_eq!(by_key.values().map(Vec::len).sum::<usize>() as u64, EVENTS);
    (by_key, stats.failed)
}

/// How many times a key's order ids go down on the stream.
fn inversions(by_key: &HashMap<u64, Vec<u64>>) -> usize {
    by_key
        .values()
        .map(|ids| ids.windows(2).filter(|w| w[0] > w[1]).count())
        .sum()
}

#[test]
fn an_ordered_export_keeps_each_keys_order_through_an_outage() {
    let (by_key, failed) = export_through_an_outage("ordered", ExportOptions::new().ordered());
    // Only each key's first event was tried during the outage (about 5 times each): the
    // others waited without spending attempts.
    assert!(failed < 160, "{failed} attempts failed");
    for (key, ids) in &by_key {
        let expected: Vec<u64> = (0..320).filter(|id| id % 8 == *key).collect();
        assert_eq!(ids, &expected, "key {key}");
    }
}

#[test]
fn without_ordering_retried_exports_land_after_later_events_of_their_key() {
    let (by_key, failed) = export_through_an_outage("unordered", ExportOptions::new());
    assert!(failed >= 160, "{failed} attempts failed");
    assert!(inversions(&by_key) > 0, "{by_key:?}");
}

/// Under an ordered export, an event whose last attempt fails is dead-lettered and lets its
/// key go on: the stream holds the rest of the key in order.
#[test]
fn an_ordered_export_goes_on_past_a_dead_lettered_event() {
    let retry = microbus::RetryPolicy::fixed(Duration::from_millis(10)).max_attempts(2);
    let mut outage = Outage::start("ordered-dead", retry, ExportOptions::new().ordered());
    (0..80).for_each(|id| outage.publish(id, 4));
    outage.mend(Duration::from_millis(100));
    outage.orders.flush(WAIT).unwrap();
    let (on_stream, entries) = outage.on_stream(4);
    let letters = outage.orders.dead_letters().list();
    assert!(!letters.is_empty());
    let mut dead: Vec<u64> = letters
        .iter()
        .map(|l| {
            serde_json::from_str::<OrderCreated>(l.payload_json())
                .unwrap()
                .order_id
        })
        .collect();
    dead.sort_unstable();
    let stats = outage.orders.stats();
    assert_eq!(
        (stats.succeeded, stats.dead_lettered, stats.in_flight),
        (entries as u64, dead.len() as u64, 0)
    );
    assert_eq!(entries + dead.len(), 80);
    for (key, ids) in &on_stream {
        // What reached the stream is the key's tail after its dead letters, in order.
        let expected: Vec<u64> = (0..80)
            .filter(|id| id % 4 == *key && !dead.contains(id))
            .collect();
        assert_eq!(ids, &expected, "key {key}");
        assert!(
            dead.iter()
                .filter(|id| *id % 4 == *key)
                .all(|d| d < &ids[0])
        );
    }
}

#[test]
fn a_paused_subscription_holds_its_import_back_and_its_entries_stay_pending() {
    const EVENTS: u64 = 400;
    let exported = exported_orders("paused-import", EVENTS);
    let payments = Bus::builder()
        .service_name("payments")
        .workers(2)
        .build()
        .unwrap();
    let handled: Arc<Mutex<Vec<u64>>> = Arc::default();
    let subscription = {
        let handled = handled.clone();
        payments
            .subscribe_with(
                microbus::SubscribeOptions::new().park_capacity(50),
                move |e: &OrderCreated, _: &Context| -> HandlerResult {
                    handled.lock().unwrap().push(e.order_id);
                    Ok(())
                },
            )
            .unwrap()
    };
    subscription.pause();
    let bridge = Bridge::connect(&payments, &exported.url, &exported.prefix).unwrap();
    bridge.import::<OrderCreated>("payments").unwrap();
    let parked = || payments.metrics().handlers[0].parked;
    let deadline = Instant::now() + WAIT;
    while parked() < 50 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(parked() >= 50);
    // Should an assertion below fail, resume before the bridge is dropped: a bridge stops
    // once the entries it holds settle.
    struct ResumeOnDrop<'a>(&'a microbus::Subscription);
    impl Drop for ResumeOnDrop<'_> {
        fn drop(&mut self) {
            self.0.resume();
        }
    }
    let _resume = ResumeOnDrop(&subscription);
    while bridge.stats().imported == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    // The import waits for room: it stops publishing, and so reading, while the park is
    // full; what it read stays pending, since nothing of it settled.
    let imported = bridge.stats().imported;
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(bridge.stats().imported, imported, "the import went on");
    assert!(imported < EVENTS, "{imported}");
    let mut redis = redis_connection(&exported.url);
    let pending =
        |redis: &mut redis::Connection| pending_entries(redis, &exported.stream, "payments");
    assert!(pending(&mut redis) >= 50);
    assert_eq!(bridge.stats().acked, 0);
    // The health report shows the paused subscription (a batch is held back as a whole, so
    // the park may pass its capacity by one read).
    let health = payments.health();
    assert_eq!(health.paused.len(), 1);
    assert!(health.paused[0].parked >= 50, "{health}");
    assert!(handled.lock().unwrap().is_empty());
    subscription.resume();
    assert_eq!(
        wait_for_orders(&handled, EVENTS as usize, WAIT),
        EVENTS as usize
    );
    let deadline = Instant::now() + WAIT;
    while (bridge.stats().acked < EVENTS || pending(&mut redis) > 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        pending(&mut redis),
        0,
        "every entry was acknowledged once settled"
    );
    assert_eq!(handled.lock().unwrap().len() as u64, EVENTS);
    bridge.stop();
    assert!(payments.shutdown().unwrap().is_balanced());
}

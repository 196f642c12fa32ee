//! Lanes: subscriptions on workers of their own, isolated from the others; per-key order in
//! every lane; one publish shared by several lanes; `Block` and `Shed` overload; bad input.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Keyed, Numbered, Tally, WAIT, count};
use microbus::{
    Backpressure, Bus, BusBuilder, Context, DeadLetterReason, HandlerResult, Lane, Publish,
    PublishError, SubscribeError, SubscribeOptions, TryPublishError,
};

const EVENTS: u64 = 10_000;

/// A subscription on lane `lane` whose handler waits for `release` before its first return,
/// counting what it handled.
fn blocked_on(
    bus: &Bus,
    lane: &str,
) -> (
    Arc<AtomicU64>,
    crossbeam_channel::Sender<()>,
    crossbeam_channel::Receiver<()>,
) {
    let handled = Arc::new(AtomicU64::new(0));
    let (release, released) = crossbeam_channel::bounded::<()>(1);
    let (entered_tx, entered) = crossbeam_channel::bounded::<()>(1);
    let counter = handled.clone();
    let first = std::sync::atomic::AtomicBool::new(true);
    bus.subscribe_with(
        SubscribeOptions::new().named("slow").lane(lane),
        move |_: &Numbered, _: &Context| -> HandlerResult {
            if first.swap(false, Ordering::SeqCst) {
                entered_tx.send(()).unwrap();
                released.recv().unwrap();
            }
            counter.fetch_add(1, Ordering::SeqCst);
            Ok(())
        },
    )
    .unwrap();
    (handled, release, entered)
}

/// A subscription on the default lane that signals once it has handled `n` events.
fn fast(bus: &Bus, n: u64) -> (Arc<AtomicU64>, crossbeam_channel::Receiver<()>) {
    let handled = Arc::new(AtomicU64::new(0));
    let (done_tx, done) = crossbeam_channel::bounded::<()>(1);
    let counter = handled.clone();
    bus.subscribe(move |_: &Numbered, _: &Context| -> HandlerResult {
        if counter.fetch_add(1, Ordering::SeqCst) + 1 == n {
            done_tx.send(()).unwrap();
        }
        Ok(())
    })
    .unwrap();
    (handled, done)
}

#[test]
fn a_blocked_shed_lane_holds_back_neither_the_publisher_nor_the_default_lane() {
    let bus = Bus::builder()
        .workers(2)
        .lane(
            "slow",
            Lane::new(1)
                .channel_capacity(16)
                .backpressure(Backpressure::Shed),
        )
        .build()
        .unwrap();
    let (slow, release, entered) = blocked_on(&bus, "slow");
    let (fast, all_fast) = fast(&bus, EVENTS);
    for seq in 0..EVENTS {
        // A blocking publish: with the slow lane full it must not wait.
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    all_fast.recv_timeout(WAIT).unwrap();
    entered.recv_timeout(WAIT).unwrap();
    assert_eq!((count(&fast), count(&slow)), (EVENTS, 0));
    let health = bus.health();
    assert_eq!(health.full_lanes.len(), 1, "{health}");
    assert_eq!(
        (
            health.full_lanes[0].lane.as_str(),
            health.full_lanes[0].full_shards
        ),
        ("slow", 1)
    );
    assert!(health.to_string().contains("lane slow full"), "{health}");
    // A flush that gives up says which lane holds what.
    let err = bus.flush(Duration::from_millis(20)).unwrap_err();
    let pending = err.pending().unwrap();
    let lanes: Vec<_> = pending
        .lanes
        .iter()
        .map(|l| (l.lane.as_str(), l.queued, l.running))
        .collect();
    assert_eq!(
        (lanes.len(), lanes[0].0, lanes[1]),
        (2, "default", ("slow", 16, 1))
    );
    assert!(
        err.to_string()
            .contains("by lane: slow: 16 queued, 1 running"),
        "{err}"
    );
    release.send(()).unwrap();
    bus.flush(WAIT).unwrap();
    let lane = bus.metrics().lanes[1].clone();
    assert_eq!(
        (lane.name.as_str(), lane.backpressure.as_str()),
        ("slow", "shed")
    );
    assert!(lane.shed > 0, "a 16-slot lane took all {EVENTS}");
    assert_eq!(lane.shed + count(&slow), EVENTS);
    let shed_letters = bus
        .dead_letters()
        .list()
        .iter()
        .filter(|l| l.reason() == DeadLetterReason::Shed && l.handler() == "slow")
        .count() as u64;
    assert_eq!(shed_letters, lane.shed);
    let stats = bus.stats();
    assert_eq!(stats.delivered, 2 * EVENTS);
    assert_eq!(stats.succeeded + stats.dead_lettered, 2 * EVENTS);
    assert_eq!(stats.dead_lettered, lane.shed);
    let report = bus.shutdown().unwrap();
    assert!(report.is_balanced(), "{report}");
    let books: Vec<_> = report
        .lanes
        .iter()
        .map(|l| (l.lane.as_str(), l.accepted, l.settled, l.shed))
        .collect();
    assert_eq!(
        books,
        [
            ("default", EVENTS, EVENTS, 0),
            ("slow", EVENTS, EVENTS, lane.shed)
        ]
    );
}

#[test]
fn a_blocked_block_lane_makes_the_publisher_wait_and_holds_back_nothing_else() {
    let bus = Bus::builder()
        .workers(2)
        .lane("slow", Lane::new(1).channel_capacity(16))
        .build()
        .unwrap();
    let (slow, release, entered) = blocked_on(&bus, "slow");
    // Only the slow lane has subscriptions: a try_publish gets the event back once it is full.
    let mut accepted = 0;
    let refused = loop {
        match bus.try_publish(Numbered {
            publisher: 0,
            seq: accepted,
        }) {
            Ok(_) => accepted += 1,
            Err(TryPublishError::Full(event)) => break event,
            Err(e) => panic!("{e}"),
        }
        assert!(accepted < EVENTS, "a 16-slot lane never filled");
    };
    assert_eq!(refused.seq, accepted);
    entered.recv_timeout(WAIT).unwrap();
    // With a subscription on the default lane too, a blocking publisher waits for the slow
    // lane while the default lane handles what it was given.
    let (fast, _) = fast(&bus, u64::MAX);
    let publisher = {
        let bus = bus.service("publisher").unwrap();
        std::thread::spawn(move || {
            for seq in 0..EVENTS {
                bus.publish(Numbered { publisher: 1, seq }).unwrap();
            }
        })
    };
    let deadline = std::time::Instant::now() + WAIT;
    while bus.metrics().lanes[1].publisher_wait_nanos == 0 || count(&fast) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the publisher never waited"
        );
        std::thread::yield_now();
    }
    assert!(!publisher.is_finished());
    assert!(count(&fast) < EVENTS);
    assert_eq!(count(&slow), 0);
    release.send(()).unwrap();
    publisher.join().unwrap();
    bus.flush(WAIT).unwrap();
    assert_eq!((count(&fast), count(&slow)), (EVENTS, accepted + EVENTS));
    assert!(bus.shutdown().unwrap().is_balanced());
}

#[test]
fn each_key_keeps_its_order_in_every_lane() {
    const PER_PUBLISHER: u64 = 20_000;
    const KEYS: u64 = 64;
    let bus = Bus::builder()
        .workers(2)
        .channel_capacity(64)
        .lane("a", Lane::new(2).channel_capacity(32))
        .lane(
            "b",
            Lane::new(3).channel_capacity(16).wait_strategy(
                microbus::WaitStrategy::spin_then_park(Duration::from_micros(20)),
            ),
        )
        .build()
        .unwrap();
    type Seen = Arc<Mutex<HashMap<(u32, u64), Vec<u64>>>>;
    let mut seen: Vec<Seen> = Vec::new();
    for lane in [None, Some("a"), Some("b")] {
        let log: Seen = Arc::default();
        seen.push(log.clone());
        let options = match lane {
            Some(lane) => SubscribeOptions::new().lane(lane),
            None => SubscribeOptions::new(),
        };
        bus.subscribe_with(options, move |e: &Keyed, ctx: &Context| -> HandlerResult {
            let publisher = ctx.source().len() as u32;
            log.lock()
                .unwrap()
                .entry((publisher, e.key))
                .or_default()
                .push(e.seq);
            Ok(())
        })
        .unwrap();
    }
    let publishers: Vec<_> = ["p1", "p22"]
        .into_iter()
        .map(|name| {
            let bus = bus.service(name).unwrap();
            std::thread::spawn(move || {
                for seq in 0..PER_PUBLISHER {
                    let key = seq % KEYS;
                    bus.publish_with(Keyed { key, seq }, Publish::keyed(key))
                        .unwrap();
                }
            })
        })
        .collect();
    for p in publishers {
        p.join().unwrap();
    }
    bus.flush(WAIT).unwrap();
    for log in &seen {
        let log = log.lock().unwrap();
        assert_eq!(log.len(), 2 * KEYS as usize);
        let mut total = 0;
        for seqs in log.values() {
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "out of order");
            total += seqs.len() as u64;
        }
        assert_eq!(total, 2 * PER_PUBLISHER);
    }
    let stats = bus.stats();
    assert_eq!(
        (stats.delivered, stats.succeeded),
        (6 * PER_PUBLISHER, 6 * PER_PUBLISHER)
    );
    assert!(bus.shutdown().unwrap().is_balanced());
}

#[test]
fn a_shutdown_racing_publishers_into_three_lanes_hands_back_or_settles_everywhere() {
    const PER_PUBLISHER: u64 = 3_000;
    let bus = Bus::builder()
        .workers(1)
        .channel_capacity(2)
        .lane("a", Lane::new(1).channel_capacity(2))
        .lane(
            "b",
            Lane::new(2)
                .channel_capacity(1)
                .backpressure(Backpressure::Shed),
        )
        .shutdown_timeout(Duration::from_millis(20))
        .build()
        .unwrap();
    let tallies: Vec<Arc<Tally>> = (0..3)
        .map(|_| Arc::new(Tally::new(3 * PER_PUBLISHER as usize)))
        .collect();
    for (tally, lane) in tallies.iter().zip([None, Some("a"), Some("b")]) {
        let tally = tally.clone();
        let options = match lane {
            Some(lane) => SubscribeOptions::new().lane(lane),
            None => SubscribeOptions::new(),
        };
        bus.subscribe_with(options, move |e: &Numbered, _: &Context| -> HandlerResult {
            tally.mark((u64::from(e.publisher) * PER_PUBLISHER + e.seq) as usize);
            Ok(())
        })
        .unwrap();
    }
    let publishers: Vec<_> = (0..3u32)
        .map(|publisher| {
            let bus = bus.clone();
            std::thread::spawn(move || {
                let mut accepted = Vec::new();
                let mut returned = Vec::new();
                for seq in 0..PER_PUBLISHER {
                    let event = Numbered { publisher, seq };
                    let index = u64::from(publisher) * PER_PUBLISHER + seq;
                    match bus.publish_with(event, Publish::new().tracked()) {
                        Ok(tracker) => accepted.push((index, tracker)),
                        Err(PublishError::Shutdown(event)) => {
                            assert_eq!((event.publisher, event.seq), (publisher, seq));
                            returned.push(index);
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
                (accepted, returned)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(5));
    let report = bus.shutdown().unwrap();
    let mut returned = Vec::new();
    let mut accepted = 0;
    for p in publishers {
        let (trackers, back) = p.join().unwrap();
        accepted += trackers.len() as u64;
        returned.extend(back);
        for (index, tracker) in trackers {
            // Accepted: settled in each of its three lanes, under some outcome.
            let done = tracker.wait(WAIT).expect("every delivery settles");
            assert_eq!(done.deliveries, 3, "event {index}");
            let settled = done.succeeded
                + done.dead_lettered
                + done.discarded
                + done.cancelled
                + done.left
                + done.abandoned;
            assert_eq!(settled, 3, "event {index}: {done:?}");
        }
    }
    // Handed back: no lane ran it.
    for tally in &tallies {
        for &i in &returned {
            assert_eq!(
                tally.get(i as usize),
                0,
                "event {i} came back and was handled"
            );
        }
        assert!(tally.not_once().iter().all(|&(_, c)| c == 0), "run twice");
    }
    assert_eq!(accepted + returned.len() as u64, 3 * PER_PUBLISHER);
    let lanes: Vec<&str> = report.lanes.iter().map(|l| l.lane.as_str()).collect();
    assert_eq!(lanes, ["default", "a", "b"]);
    let swept: u64 = report.lanes.iter().map(|l| l.swept).sum();
    assert!(
        swept <= report.stats.left + report.stats.dead_lettered,
        "{report}"
    );
    assert_eq!(report.stats.delivered, 3 * accepted, "{report}");
    // Publishers go on being refused after the report.
    assert_eq!(bus.stats().refused, returned.len() as u64);
    assert!(report.is_balanced(), "{report}");
}

#[test]
fn an_event_in_several_lanes_is_tracked_tapped_and_traced_once_per_delivery() {
    let bus = Bus::builder()
        .workers(2)
        .lane("a", Lane::new(1))
        .lane("b", Lane::new(1).backpressure(Backpressure::Shed))
        .build()
        .unwrap();
    let taps = Arc::new(AtomicU64::new(0));
    let tapped = taps.clone();
    bus.tap(move |_| {
        tapped.fetch_add(1, Ordering::SeqCst);
    });
    let handled = Arc::new(Mutex::new(Vec::new()));
    for lane in ["a", "b", "a", microbus::DEFAULT_LANE] {
        let handled = handled.clone();
        bus.subscribe_with(
            SubscribeOptions::new().lane(lane),
            move |e: &Numbered, ctx: &Context| -> HandlerResult {
                handled.lock().unwrap().push((e.seq, ctx.envelope().id()));
                Ok(())
            },
        )
        .unwrap();
    }
    let tracker = bus
        .publish_with(
            Numbered {
                publisher: 0,
                seq: 1,
            },
            Publish::new().tracked(),
        )
        .unwrap();
    let done = tracker.wait(WAIT).unwrap();
    assert_eq!((done.deliveries, done.succeeded), (4, 4));
    // A batch and a delayed publish go to every lane too.
    bus.publish_batch((2..6).map(|seq| Numbered { publisher: 0, seq }))
        .unwrap();
    bus.publish_with(
        Numbered {
            publisher: 0,
            seq: 6,
        },
        Publish::new().delay(Duration::from_millis(5)),
    )
    .unwrap();
    bus.flush(WAIT).unwrap();
    let handled = handled.lock().unwrap();
    assert_eq!(handled.len(), 6 * 4);
    for seq in 1..=6 {
        let ids: Vec<_> = handled.iter().filter(|(s, _)| *s == seq).collect();
        assert_eq!(ids.len(), 4);
        assert!(
            ids.iter().all(|(_, id)| *id == ids[0].1),
            "one event, one id"
        );
    }
    assert_eq!(count(&taps), 6);
    let stats = bus.stats();
    assert_eq!((stats.delivered, stats.succeeded), (24, 24));
}

#[test]
fn lanes_are_checked_when_the_bus_is_built_and_when_subscribing() {
    let build = |builder: BusBuilder| builder.build().map(|_| ()).unwrap_err();
    let zero = build(Bus::builder().lane("email", Lane::new(0)));
    assert_eq!(zero.field(), "lane");
    assert!(zero.to_string().contains("\"email\""), "{zero}");
    let twice = build(
        Bus::builder()
            .lane("email", Lane::new(1))
            .lane("email", Lane::new(1)),
    );
    assert!(twice.to_string().contains("declared twice"), "{twice}");
    let default = build(Bus::builder().lane(microbus::DEFAULT_LANE, Lane::new(1)));
    assert!(default.to_string().contains("declared twice"), "{default}");
    let unnamed = build(Bus::builder().lane(" ", Lane::new(1)));
    assert_eq!(unnamed.field(), "lane");
    let mut many = Bus::builder();
    for i in 0..microbus::MAX_LANES {
        many = many.lane(format!("lane{i}"), Lane::new(1));
    }
    assert_eq!(build(many).field(), "lane");
    let capacity = build(Bus::builder().lane("email", Lane::new(1).channel_capacity(0)));
    assert_eq!(capacity.field(), "lane");

    let bus = Bus::builder()
        .workers(1)
        .lane("email", Lane::new(1))
        .build()
        .unwrap();
    let err = bus
        .subscribe_with(
            SubscribeOptions::new().lane("sms"),
            |_: &Numbered, _: &Context| -> HandlerResult { Ok(()) },
        )
        .unwrap_err();
    assert_eq!(err, SubscribeError::UnknownLane("sms"));
    assert!(err.to_string().contains("\"sms\""));
    assert_eq!(bus.workers(), 2);
}

#[test]
fn retries_dead_letters_redrives_and_unsubscribes_stay_in_their_lane() {
    let bus = Bus::builder()
        .workers(1)
        .lane("retrying", Lane::new(1))
        .retry(microbus::RetryPolicy::fixed(Duration::from_millis(1)).max_attempts(2))
        .build()
        .unwrap();
    // The lane's one worker is the bus's second thread.
    let threads = Arc::new(Mutex::new(Vec::new()));
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (seen, failing) = (threads.clone(), fail.clone());
    bus.subscribe_with(
        SubscribeOptions::new().named("flaky").lane("retrying"),
        move |e: &Numbered, ctx: &Context| -> HandlerResult {
            let thread = std::thread::current().name().unwrap_or("?").to_owned();
            seen.lock().unwrap().push((e.seq, ctx.attempt(), thread));
            if failing.load(Ordering::SeqCst) {
                return Err(microbus::HandlerError::msg("down"));
            }
            Ok(())
        },
    )
    .unwrap();
    bus.publish(Numbered {
        publisher: 0,
        seq: 1,
    })
    .unwrap();
    bus.flush(WAIT).unwrap();
    let letters = bus.dead_letters().list();
    assert_eq!(letters.len(), 1);
    fail.store(false, Ordering::SeqCst);
    bus.dead_letters().redrive(letters[0].id()).unwrap();
    bus.flush(WAIT).unwrap();
    let threads = threads.lock().unwrap().clone();
    assert_eq!(
        threads,
        [1, 2, 1].map(|attempt| (1, attempt, "microbus-worker-1".to_owned()))
    );

    // An unsubscribe cancels what waits for it in its lane.
    let (held, release, entered) = blocked_on(&bus, "retrying");
    let gone = bus
        .subscribe_with(
            SubscribeOptions::new().named("gone").lane("retrying"),
            |_: &Numbered, _: &Context| -> HandlerResult { Ok(()) },
        )
        .unwrap();
    for seq in 10..20 {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    entered.recv_timeout(WAIT).unwrap();
    // Unsubscribing waits for the lane's open batch (its worker is held); once `gone` is no
    // longer active, the held worker goes on and cancels what was queued for it.
    let unsubscribing = std::thread::spawn(move || gone.unsubscribe());
    let deadline = std::time::Instant::now() + WAIT;
    while bus
        .metrics()
        .handlers
        .iter()
        .any(|h| h.handler == "gone" && h.active)
    {
        assert!(std::time::Instant::now() < deadline);
        std::thread::yield_now();
    }
    release.send(()).unwrap();
    unsubscribing.join().unwrap();
    bus.flush(WAIT).unwrap();
    assert_eq!(count(&held), 10);
    let stats = bus.stats();
    assert_eq!(stats.cancelled, 10, "{stats:?}");
    let report = bus.shutdown().unwrap();
    assert!(
        report.is_balanced() && report.lanes.iter().all(|l| l.is_balanced()),
        "{report}"
    );
}

#[cfg(feature = "rayon")]
#[test]
fn a_parallel_iterator_publishes_into_every_lane() {
    use rayon::prelude::*;
    let bus = Bus::builder()
        .workers(2)
        .lane("a", Lane::new(1).channel_capacity(8))
        .build()
        .unwrap();
    let tallies: Vec<Arc<Tally>> = (0..2).map(|_| Arc::new(Tally::new(20_000))).collect();
    for (tally, lane) in tallies.iter().zip([microbus::DEFAULT_LANE, "a"]) {
        let tally = tally.clone();
        bus.subscribe_with(
            SubscribeOptions::new().lane(lane),
            move |e: &Numbered, _: &Context| -> HandlerResult {
                tally.mark(e.seq as usize);
                Ok(())
            },
        )
        .unwrap();
    }
    bus.publish_par_iter(
        (0..20_000u64)
            .into_par_iter()
            .map(|seq| Numbered { publisher: 0, seq }),
    )
    .unwrap();
    bus.flush(WAIT).unwrap();
    for tally in &tallies {
        assert_eq!(tally.not_once(), vec![]);
    }
    let prometheus = bus.metrics().to_prometheus();
    assert!(
        prometheus.contains("microbus_lane_queue_depth{lane=\"a\"} 0"),
        "{prometheus}"
    );
    assert!(prometheus.contains("microbus_lane_shed_total{lane=\"default\"} 0"));
}

#[test]
fn a_handlers_staged_events_wait_for_a_full_shed_lane_and_are_never_shed() {
    const STAGED: u64 = 500;
    let bus = Bus::builder()
        .workers(1)
        .lane(
            "slow",
            Lane::new(1)
                .channel_capacity(4)
                .backpressure(Backpressure::Shed),
        )
        .build()
        .unwrap();
    let (slow, release, entered) = blocked_on(&bus, "slow");
    // A default-lane handler that publishes one `Numbered` into the slow lane per `Keyed`.
    let staging = Arc::new(AtomicU64::new(0));
    let (all_staged_tx, all_staged) = crossbeam_channel::bounded::<()>(1);
    let counter = staging.clone();
    bus.subscribe(move |k: &Keyed, ctx: &Context| -> HandlerResult {
        ctx.publish(Numbered {
            publisher: 1,
            seq: k.seq,
        })?;
        if counter.fetch_add(1, Ordering::SeqCst) + 1 == STAGED {
            all_staged_tx.send(()).unwrap();
        }
        Ok(())
    })
    .unwrap();
    for seq in 0..STAGED {
        bus.publish(Keyed { key: seq % 8, seq }).unwrap();
    }
    all_staged.recv_timeout(WAIT).unwrap();
    entered.recv_timeout(WAIT).unwrap();
    // The slow lane is full and its handler blocked: what the handler staged waits.
    assert_eq!(bus.metrics().lanes[1].shed, 0);
    // The staged events keep the lane's 4 slots full (they are offered again from the spill
    // queue until they fit), so an outside publish into it is shed at once.
    let start = std::time::Instant::now();
    while bus.metrics().lanes[1].queue_depth < 4 {
        assert!(
            start.elapsed() < WAIT,
            "the staged events never filled the lane"
        );
        std::thread::yield_now();
    }
    for seq in 0..10 {
        bus.publish(Numbered { publisher: 2, seq }).unwrap();
    }
    let shed = bus.metrics().lanes[1].shed;
    assert_eq!(shed, 10);
    release.send(()).unwrap();
    bus.flush(WAIT).unwrap();
    assert_eq!(count(&slow), STAGED);
    assert_eq!(bus.metrics().lanes[1].shed, 10);
    let shed_letters: Vec<bool> = bus
        .dead_letters()
        .list()
        .iter()
        .filter(|l| l.reason() == DeadLetterReason::Shed)
        .map(|l| l.payload_json().contains(r#""publisher":2"#))
        .collect();
    assert_eq!(
        shed_letters,
        vec![true; 10],
        "only outside publishes were shed"
    );
    let report = bus.shutdown().unwrap();
    assert!(report.is_balanced(), "{report}");
}

//! Dead letters: deliveries that failed for good are kept, counted, exported, redriven and
//! purged; nothing leaves the ring without a trace.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Numbered, WAIT, count};
use microbus::{
    Bus, Context, DeadLetterFilter, DeadLetterReason, EventId, HandlerError, HandlerResult,
    Publish, RedriveError, RetryPolicy, SubscribeOptions,
};

fn fast(attempts: u32) -> RetryPolicy {
    RetryPolicy::fixed(Duration::from_millis(1)).max_attempts(attempts)
}

#[test]
fn an_exhausted_delivery_keeps_every_error_and_a_permanent_one_keeps_one() {
    let bus = Bus::builder()
        .service_name("Orders")
        .workers(1)
        .retry(fast(3))
        .build()
        .unwrap();
    let payments = bus.service("Payments").unwrap();
    payments
        .subscribe_with(
            SubscribeOptions::new().named("charge"),
            |e: &Numbered, ctx: &Context| -> HandlerResult {
                Err(HandlerError::msg(format_args!(
                    "attempt {} of {}",
                    ctx.attempt(),
                    e.seq
                )))
            },
        )
        .unwrap();
    payments
        .subscribe_with(
            SubscribeOptions::new().named("fraud-check"),
            |_: &Numbered, _: &Context| -> HandlerResult {
                Err(HandlerError::permanent(HandlerError::msg("blocked card")))
            },
        )
        .unwrap();
    let trace = EventId::new();
    bus.publish_with(
        Numbered {
            publisher: 1,
            seq: 7,
        },
        Publish::keyed(7u64).correlation(trace),
    )
    .unwrap();
    bus.flush(WAIT).unwrap();

    let dead = bus.dead_letters();
    assert_eq!(dead.len(), 2);
    let exhausted = &dead.filter(&DeadLetterFilter::new().handler("charge"))[0];
    assert_eq!(exhausted.reason(), DeadLetterReason::RetriesExhausted);
    assert_eq!(exhausted.attempts(), 3);
    assert_eq!(
        exhausted.errors(),
        ["attempt 1 of 7", "attempt 2 of 7", "attempt 3 of 7"]
    );
    assert_eq!(exhausted.service(), "Payments");
    assert_eq!(exhausted.event_name(), "Numbered");
    assert_eq!(exhausted.envelope().correlation_id(), trace);
    assert_eq!(exhausted.envelope().source(), "Orders");
    assert!(exhausted.first_failure() <= exhausted.last_failure());
    let payload: Numbered = serde_json::from_str(exhausted.payload_json()).unwrap();
    assert_eq!(
        payload,
        Numbered {
            publisher: 1,
            seq: 7
        }
    );

    let permanent = &dead.filter(&DeadLetterFilter::new().reason(DeadLetterReason::Permanent))[0];
    assert_eq!(permanent.handler(), "fraud-check");
    assert_eq!(
        (permanent.attempts(), permanent.errors()),
        (1, &["blocked card".to_owned()][..])
    );
    assert_eq!(permanent.envelope().id(), exhausted.envelope().id());

    let stats = bus.stats();
    assert_eq!(
        (stats.delivered, stats.dead_lettered, stats.failed),
        (2, 2, 4)
    );
    assert!(stats.is_balanced());
}

#[test]
fn a_full_ring_evicts_the_oldest_to_the_sink() {
    let sunk = Arc::new(Mutex::new(Vec::new()));
    let alerted = Arc::new(AtomicU64::new(0));
    let bus = {
        let (sunk, alerted) = (sunk.clone(), alerted.clone());
        Bus::builder()
            .workers(1)
            .retry(RetryPolicy::none())
            .dead_letter_capacity(8)
            .dead_letter_sink(move |l| sunk.lock().unwrap().push(l.id()))
            .on_dead_letter(move |_| {
                alerted.fetch_add(1, Ordering::SeqCst);
            })
            .build()
            .unwrap()
    };
    bus.subscribe(|_: &Numbered, _: &Context| -> HandlerResult { Err(HandlerError::msg("no")) })
        .unwrap();
    for seq in 0..20 {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    bus.flush(WAIT).unwrap();
    let dead = bus.dead_letters();
    let kept: Vec<u64> = dead
        .list()
        .iter()
        .map(|l| {
            serde_json::from_str::<Numbered>(l.payload_json())
                .unwrap()
                .seq
        })
        .collect();
    assert_eq!(kept, (12..20).collect::<Vec<_>>());
    assert_eq!(dead.len(), 8);
    assert_eq!(dead.capacity(), 8);
    assert_eq!(dead.evicted(), 12);
    assert_eq!(*sunk.lock().unwrap(), (1..=12).collect::<Vec<_>>());
    assert_eq!(count(&alerted), 20);
    let stats = bus.stats();
    assert_eq!((stats.dead_lettered, stats.evicted), (20, 12));
    assert!(stats.is_balanced());
}

#[test]
fn a_redriven_dead_letter_reaches_the_fixed_handler_once_with_its_envelope() {
    let bus = Bus::builder()
        .workers(2)
        .retry(RetryPolicy::none())
        .build()
        .unwrap();
    let fixed = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    {
        let (fixed, seen) = (fixed.clone(), seen.clone());
        bus.subscribe(move |e: &Numbered, ctx: &Context| -> HandlerResult {
            if !fixed.load(Ordering::SeqCst) {
                return Err(HandlerError::msg("broken"));
            }
            seen.lock()
                .unwrap()
                .push((e.seq, ctx.event_id(), ctx.correlation_id(), ctx.attempt()));
            Ok(())
        })
        .unwrap();
    }
    bus.publish(Numbered {
        publisher: 0,
        seq: 1,
    })
    .unwrap();
    bus.publish(Numbered {
        publisher: 0,
        seq: 2,
    })
    .unwrap();
    bus.flush(WAIT).unwrap();
    let dead = bus.dead_letters();
    let letters = dead.list();
    assert_eq!(letters.len(), 2);
    fixed.store(true, Ordering::SeqCst);

    let first = &letters[0];
    dead.redrive(first.id()).unwrap();
    bus.flush(WAIT).unwrap();
    assert_eq!(dead.len(), 1);
    let first_seq = serde_json::from_str::<Numbered>(first.payload_json())
        .unwrap()
        .seq;
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(
            first_seq,
            first.envelope().id(),
            first.envelope().correlation_id(),
            1
        )]
    );
    assert_eq!(
        dead.redrive(first.id()),
        Err(RedriveError::NotFound(first.id()))
    );

    assert_eq!(dead.redrive_all(), Ok(1));
    bus.flush(WAIT).unwrap();
    assert!(dead.is_empty());
    assert_eq!(seen.lock().unwrap().len(), 2);
    let stats = bus.stats();
    // Two deliveries dead-lettered, then two more (the redrives) succeeded.
    assert_eq!(
        (stats.delivered, stats.dead_lettered, stats.succeeded),
        (4, 2, 2)
    );
    assert!(stats.is_balanced());
}

#[test]
fn export_is_one_json_object_per_line() {
    let bus = Bus::builder()
        .workers(1)
        .retry(RetryPolicy::none())
        .build()
        .unwrap();
    bus.subscribe(|_: &Numbered, _: &Context| -> HandlerResult { Err(HandlerError::msg("x")) })
        .unwrap();
    for seq in 0..3 {
        bus.publish_with(
            Numbered { publisher: 0, seq },
            Publish::new().header("tenant", "acme"),
        )
        .unwrap();
    }
    bus.flush(WAIT).unwrap();
    let export = bus.dead_letters().export_json_lines();
    let lines: Vec<serde_json::Value> = export
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for (seq, line) in lines.iter().enumerate() {
        assert_eq!(line["event"], "Numbered");
        assert_eq!(line["version"], 1);
        assert_eq!(line["payload"]["seq"], seq);
        assert_eq!(line["errors"][0], "x");
        assert_eq!(line["reason"], "retries_exhausted");
        assert_eq!(line["envelope"]["source"], "app");
        let id: EventId = line["envelope"]["id"].as_str().unwrap().parse().unwrap();
        assert_eq!(line["envelope"]["correlation_id"], id.to_string());
    }
}

#[test]
fn filters_choose_what_to_redrive_and_purge_and_gone_subscriptions_stay() {
    let bus = Bus::builder()
        .workers(1)
        .retry(RetryPolicy::none())
        .build()
        .unwrap();
    let a = bus.service("A").unwrap();
    let b = bus.service("B").unwrap();
    let kept = bus
        .subscribe_with(
            SubscribeOptions::new().named("kept"),
            |_: &Numbered, _: &Context| -> HandlerResult { Err(HandlerError::msg("no")) },
        )
        .unwrap();
    let gone = bus
        .subscribe_with(
            SubscribeOptions::new().named("gone"),
            |_: &Numbered, _: &Context| -> HandlerResult { Err(HandlerError::msg("no")) },
        )
        .unwrap();
    a.publish(Numbered {
        publisher: 0,
        seq: 0,
    })
    .unwrap();
    b.publish(Numbered {
        publisher: 0,
        seq: 1,
    })
    .unwrap();
    bus.flush(WAIT).unwrap();
    let dead = bus.dead_letters();
    assert_eq!(dead.len(), 4);
    assert_eq!(dead.filter(&DeadLetterFilter::new().source("A")).len(), 2);
    assert_eq!(
        dead.filter(&DeadLetterFilter::new().event("Other")).len(),
        0
    );

    gone.unsubscribe();
    let gone_letter = dead.filter(&DeadLetterFilter::new().handler("gone"))[0].id();
    assert_eq!(
        dead.redrive(gone_letter),
        Err(RedriveError::SubscriptionGone(gone_letter))
    );
    assert_eq!(dead.len(), 4, "a failed redrive keeps the dead letter");
    // With both subscriptions ended nothing goes back, and every dead letter stays.
    kept.unsubscribe();
    assert_eq!(dead.redrive_all(), Ok(0));
    assert_eq!(dead.purge_where(&DeadLetterFilter::new().source("B")), 2);
    assert_eq!(dead.purge(), 2);
    assert!(dead.is_empty());
}

#[test]
fn with_dead_letters_off_failures_are_discarded() {
    let bus = Bus::builder()
        .workers(1)
        .retry(fast(2))
        .dead_letter_capacity(0)
        .build()
        .unwrap();
    bus.subscribe(|_: &Numbered, _: &Context| -> HandlerResult { Err(HandlerError::msg("no")) })
        .unwrap();
    bus.publish(Numbered {
        publisher: 0,
        seq: 0,
    })
    .unwrap();
    bus.flush(WAIT).unwrap();
    assert!(bus.dead_letters().is_empty());
    let stats = bus.stats();
    assert_eq!(
        (stats.discarded, stats.dead_lettered, stats.failed),
        (1, 0, 2)
    );
    assert!(stats.is_balanced());
}

#[test]
fn shutdown_dead_letters_retries_not_yet_due() {
    let bus = Bus::builder()
        .workers(1)
        .retry(RetryPolicy::fixed(Duration::from_secs(300)).max_attempts(2))
        .build()
        .unwrap();
    bus.subscribe(|_: &Numbered, _: &Context| -> HandlerResult { Err(HandlerError::msg("later")) })
        .unwrap();
    bus.publish(Numbered {
        publisher: 0,
        seq: 0,
    })
    .unwrap();
    while bus.stats().retried == 0 {
        std::thread::yield_now();
    }
    let report = bus.shutdown().unwrap();
    assert_eq!(report.stats.dead_lettered, 1);
    assert!(report.is_balanced(), "{report}");
    let letters = bus.dead_letters().list();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason(), DeadLetterReason::Shutdown);
    assert_eq!(letters[0].errors(), ["later"]);
    assert_eq!(
        bus.dead_letters().redrive(letters[0].id()),
        Err(RedriveError::Shutdown(letters[0].id()))
    );
}

fn temp_file(name: &str) -> std::path::PathBuf {
    let unique = format!(
        "microbus-{name}-{}-{}.jsonl",
        std::process::id(),
        EventId::new()
    );
    std::env::temp_dir().join(unique)
}

#[test]
fn dead_letters_outlive_a_restart_through_a_json_lines_file() {
    let path = temp_file("restart");
    // Before the restart: five deliveries fail for good; the ring keeps two and the file gets
    // the three it evicts. At shutdown the rest is exported to the same file.
    let mut originals = Vec::new();
    {
        let bus = Bus::builder()
            .workers(1)
            .retry(RetryPolicy::none())
            .dead_letter_capacity(2)
            .dead_letter_file(&path)
            .build()
            .unwrap();
        let payments = bus.service("Payments").unwrap();
        let ids = Arc::new(Mutex::new(Vec::new()));
        {
            let ids = ids.clone();
            payments
                .subscribe_with(
                    SubscribeOptions::new().named("charge"),
                    move |e: &Numbered, ctx: &Context| -> HandlerResult {
                        ids.lock()
                            .unwrap()
                            .push((e.seq, ctx.event_id(), ctx.correlation_id()));
                        Err(HandlerError::msg("gateway down"))
                    },
                )
                .unwrap();
        }
        for seq in 0..5 {
            bus.publish(Numbered { publisher: 0, seq }).unwrap();
        }
        bus.flush(WAIT).unwrap();
        assert_eq!(bus.dead_letters().evicted(), 3);
        bus.shutdown().unwrap();
        let rest = bus.dead_letters().export_json_lines();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, rest.as_bytes()))
            .unwrap();
        originals.extend(ids.lock().unwrap().iter().copied());
    }
    // After the restart: the same service subscribes the fixed handler under the same name,
    // loads the file and redrives everything.
    let bus = Bus::builder().workers(2).build().unwrap();
    let payments = bus.service("Payments").unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    {
        let seen = seen.clone();
        payments
            .subscribe_with(
                SubscribeOptions::new().named("charge"),
                move |e: &Numbered, ctx: &Context| -> HandlerResult {
                    seen.lock()
                        .unwrap()
                        .push((e.seq, ctx.event_id(), ctx.correlation_id()));
                    Ok(())
                },
            )
            .unwrap();
    }
    let file = std::io::BufReader::new(std::fs::File::open(&path).unwrap());
    let summary = bus.dead_letters().load_json_lines(file).unwrap();
    assert_eq!((summary.loaded, summary.not_redrivable), (5, 0));
    assert!(summary.malformed.is_empty());
    let loaded = bus.dead_letters().list();
    assert!(
        loaded
            .iter()
            .all(|l| l.errors() == ["gateway down"] && l.handler() == "charge")
    );
    assert_eq!(bus.dead_letters().redrive_all(), Ok(5));
    bus.flush(WAIT).unwrap();
    let mut seen = seen.lock().unwrap().clone();
    seen.sort_by_key(|s| s.0);
    originals.sort_by_key(|s| s.0);
    assert_eq!(seen, originals, "the same events, ids and correlations");
    assert!(bus.dead_letters().is_empty());
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn entries_that_no_longer_decode_load_as_raw_json_with_the_reason() {
    let bus = Bus::builder().workers(1).build().unwrap();
    bus.subscribe_with(
        SubscribeOptions::new().named("charge"),
        |_: &Numbered, _: &Context| -> HandlerResult { Ok(()) },
    )
    .unwrap();
    let id = EventId::new();
    let line = |event: &str, version: u32, payload: &str, handler: &str| {
        format!(
            r#"{{"event":"{event}","version":{version},"envelope":{{"id":"{id}","correlation_id":"{id}","causation_id":null,"source":"app","key":null,"headers":{{}}}},"payload":{payload},"handler":"{handler}","service":"app","attempts":1,"errors":["x"],"first_failure_unix_nanos":1,"last_failure_unix_nanos":2,"reason":"permanent"}}"#
        )
    };
    let file = [
        line("Numbered", 1, r#"{"publisher":0,"seq":1}"#, "charge"),
        line("Numbered", 1, r#"{"publisher":"zero"}"#, "charge"),
        line("Numbered", 2, r#"{"publisher":0,"seq":1}"#, "charge"),
        line("Numbered", 1, r#"{"publisher":0,"seq":1}"#, "refund"),
        "not json".to_owned(),
    ]
    .join("\n");
    let summary = bus
        .dead_letters()
        .load_json_lines(std::io::Cursor::new(file))
        .unwrap();
    assert_eq!((summary.loaded, summary.not_redrivable), (4, 3));
    assert_eq!(summary.malformed.len(), 1);
    assert_eq!(summary.malformed[0].0, 5);
    let letters = bus.dead_letters().list();
    assert_eq!(letters[0].not_redrivable(), None);
    assert!(
        letters[1]
            .not_redrivable()
            .unwrap()
            .contains("does not decode")
    );
    assert_eq!(letters[1].payload_json(), r#"{"publisher":"zero"}"#);
    assert!(letters[2].not_redrivable().unwrap().contains("v2"));
    assert!(letters[3].not_redrivable().unwrap().contains("refund"));
    assert_eq!(letters[0].envelope().id(), id);
    assert_eq!(
        bus.dead_letters().redrive(letters[1].id()),
        Err(RedriveError::NotRedrivable(letters[1].id()))
    );
    assert_eq!(bus.dead_letters().redrive_all(), Ok(1));
    bus.flush(WAIT).unwrap();
    assert_eq!(bus.dead_letters().len(), 3);
}

#[test]
fn a_dead_letter_file_that_cannot_be_opened_is_a_config_error() {
    let err = Bus::builder()
        .dead_letter_file("/nonexistent-directory/dead.jsonl")
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "dead_letter_file");
}

#[cfg(target_os = "linux")]
#[test]
fn a_sink_line_that_cannot_be_written_is_counted() {
    // Every write to /dev/full fails with "no space left on device".
    let bus = Bus::builder()
        .workers(1)
        .retry(RetryPolicy::none())
        .dead_letter_capacity(1)
        .dead_letter_file("/dev/full")
        .build()
        .unwrap();
    bus.subscribe(|_: &Numbered, _: &Context| -> HandlerResult { Err(HandlerError::msg("no")) })
        .unwrap();
    for seq in 0..4 {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    bus.flush(WAIT).unwrap();
    let dead = bus.dead_letters();
    assert_eq!(
        (dead.len(), dead.evicted(), dead.sink_failures()),
        (1, 3, 3)
    );
}

/// A bus whose handler of `Numbered` fails (no retries) until `fixed` is set, with `events`
/// dead letters already in its ring.
fn failed_bus(events: u64, capacity: usize, fixed: Arc<AtomicBool>) -> Bus {
    let bus = Bus::builder()
        .workers(2)
        .retry(RetryPolicy::none())
        .dead_letter_capacity(capacity)
        .build()
        .unwrap();
    bus.subscribe_with(
        SubscribeOptions::new().named("charge"),
        move |_: &Numbered, _: &Context| -> HandlerResult {
            if fixed.load(Ordering::SeqCst) {
                return Ok(());
            }
            Err(HandlerError::msg("down"))
        },
    )
    .unwrap();
    for seq in 0..events {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    bus.flush(WAIT).unwrap();
    bus
}

#[test]
fn a_line_cut_inside_a_character_is_one_more_bad_line() {
    let exported = failed_bus(3, 10, Arc::default())
        .dead_letters()
        .export_json_lines();
    let lines: Vec<&str> = exported.lines().collect();
    assert_eq!(lines.len(), 3);
    // A crash cut the second line after the first byte of a two-byte character.
    let mut file = Vec::new();
    file.extend_from_slice(lines[0].as_bytes());
    file.extend_from_slice(b"\n{\"event\":\"Numbered\",\"handler\":\"caf\xc3\n");
    file.extend_from_slice(lines[1].as_bytes());
    file.extend_from_slice(b"\n");
    file.extend_from_slice(lines[2].as_bytes());
    let bus = failed_bus(0, 10, Arc::default());
    let summary = bus.dead_letters().load_json_lines(&file[..]).unwrap();
    assert_eq!(summary.loaded, 3);
    assert_eq!(summary.malformed.len(), 1, "{summary:?}");
    assert_eq!(summary.malformed[0].0, 2);
    assert!(summary.malformed[0].1.contains("UTF-8"), "{summary:?}");
    assert_eq!(bus.dead_letters().len(), 3);
    // Loading again adds the same three, no more: nothing was half-loaded before.
    let again = bus.dead_letters().load_json_lines(&file[..]).unwrap();
    assert_eq!((again.loaded, again.malformed.len()), (3, 1));
    assert_eq!(bus.dead_letters().len(), 6);
}

#[test]
fn with_dead_letters_off_loading_keeps_none_and_says_so() {
    let exported = failed_bus(3, 10, Arc::default())
        .dead_letters()
        .export_json_lines();
    let bus = failed_bus(0, 0, Arc::default());
    let summary = bus
        .dead_letters()
        .load_json_lines(exported.as_bytes())
        .unwrap();
    assert_eq!((summary.loaded, summary.not_kept), (0, 3), "{summary:?}");
    assert!(summary.malformed.is_empty());
    let dead = bus.dead_letters();
    assert_eq!((dead.len(), dead.evicted()), (0, 0));
}

#[test]
fn a_redrive_cut_short_by_shutdown_says_how_many_went_and_stayed() {
    const LETTERS: u64 = 20_000;
    let mut cut_short = 0;
    for _ in 0..20 {
        let fixed = Arc::new(AtomicBool::new(false));
        let bus = failed_bus(LETTERS, LETTERS as usize, fixed.clone());
        fixed.store(true, Ordering::SeqCst);
        let start = Arc::new(std::sync::Barrier::new(2));
        let stopper = {
            let (bus, start) = (bus.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                bus.shutdown_timeout(Duration::from_millis(100)).unwrap()
            })
        };
        start.wait();
        let result = bus.dead_letters().redrive_all();
        let report = stopper.join().unwrap();
        assert!(report.is_balanced(), "{report}");
        let dead = bus.dead_letters();
        let stayed = dead
            .filter(&DeadLetterFilter::new().reason(DeadLetterReason::RetriesExhausted))
            .len();
        // What went back out either ran or was buried again at the shutdown.
        let back = dead
            .filter(&DeadLetterFilter::new().reason(DeadLetterReason::Shutdown))
            .len() as u64;
        let went = (report.stats.succeeded + back) as usize;
        assert_eq!(dead.len(), stayed + back as usize);
        match result {
            Ok(sent) => assert_eq!((sent, stayed), (LETTERS as usize, 0)),
            Err(error) => {
                cut_short += 1;
                assert_eq!((error.redriven, error.stayed), (went, stayed), "{error}");
                assert_eq!(went + stayed, LETTERS as usize);
            }
        }
        if cut_short >= 3 {
            break;
        }
    }
    assert!(cut_short > 0, "the shutdown never cut a redrive short");
}

#[test]
fn deliveries_left_at_shutdown_can_be_kept_as_dead_letters_and_redriven_after_a_restart() {
    let (release, release_rx) = crossbeam_channel::bounded::<()>(1);
    let (entered_tx, entered) = crossbeam_channel::bounded(1);
    let bus = Bus::builder()
        .workers(1)
        .dead_letter_left_at_shutdown(true)
        .shutdown_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let payments = bus.service("Payments").unwrap();
    for name in ["charge", "audit"] {
        let (entered_tx, release_rx) = (entered_tx.clone(), release_rx.clone());
        payments
            .subscribe_with(
                SubscribeOptions::new().named(name),
                move |e: &Numbered, _: &Context| -> HandlerResult {
                    if e.seq == 0 && name == "charge" {
                        entered_tx.send(()).unwrap();
                        let _ = release_rx.recv();
                    }
                    Ok(())
                },
            )
            .unwrap();
    }
    for seq in 0..5 {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    bus.publish_batch((5..8).map(|seq| Numbered { publisher: 0, seq }))
        .unwrap();
    bus.publish_with(
        Numbered {
            publisher: 0,
            seq: 8,
        },
        Publish::new().delay(Duration::from_secs(3600)),
    )
    .unwrap();
    entered.recv().unwrap();
    let report = bus.shutdown().unwrap();
    drop(release);
    assert!(report.is_balanced(), "{report}");
    // Event 0's first delivery was running (abandoned) and its second never ran (left);
    // events 1 to 8, two deliveries each, are kept.
    let s = &report.stats;
    assert_eq!(
        (s.abandoned, s.left, s.dead_lettered),
        (1, 1, 16),
        "{report}"
    );
    let exported = bus.dead_letters().export_json_lines();
    let letters = bus.dead_letters().list();
    assert_eq!(letters.len(), 16);
    assert!(
        letters
            .iter()
            .all(|l| l.reason() == DeadLetterReason::Shutdown
                && l.attempts() == 0
                && l.errors().is_empty())
    );

    // After the restart.
    let bus = Bus::builder().workers(2).build().unwrap();
    let payments = bus.service("Payments").unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    for name in ["charge", "audit"] {
        let seen = seen.clone();
        payments
            .subscribe_with(
                SubscribeOptions::new().named(name),
                move |e: &Numbered, _: &Context| -> HandlerResult {
                    seen.lock().unwrap().push((name, e.seq));
                    Ok(())
                },
            )
            .unwrap();
    }
    let summary = bus
        .dead_letters()
        .load_json_lines(exported.as_bytes())
        .unwrap();
    assert_eq!((summary.loaded, summary.not_redrivable), (16, 0));
    assert_eq!(bus.dead_letters().redrive_all(), Ok(16));
    bus.flush(WAIT).unwrap();
    let mut seen = seen.lock().unwrap().clone();
    seen.sort();
    let expected: Vec<(&str, u64)> = ["audit", "charge"]
        .into_iter()
        .flat_map(|name| (1..9).map(move |seq| (name, seq)))
        .collect();
    assert_eq!(seen, expected);
}

/// `Numbered` at version 2, with a field version 1 did not have.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct NumberedV2 {
    publisher: u32,
    seq: u64,
    note: String,
}
impl microbus::Event for NumberedV2 {
    const NAME: &'static str = "Numbered";
    const VERSION: u32 = 2;
}

#[test]
fn dead_letters_of_an_older_version_load_through_an_upcaster() {
    // Version 1 dead-lettered three.
    let exported = failed_bus(3, 10, Arc::default())
        .dead_letters()
        .export_json_lines();
    // Version 2 reads them back.
    let bus = Bus::builder().workers(1).build().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    {
        let seen = seen.clone();
        bus.subscribe_with(
            SubscribeOptions::new().named("charge"),
            move |e: &NumberedV2, _: &Context| -> HandlerResult {
                seen.lock().unwrap().push(e.clone());
                Ok(())
            },
        )
        .unwrap();
    }
    // Without an upcaster they load, but cannot be redriven.
    let summary = bus
        .dead_letters()
        .load_json_lines(exported.as_bytes())
        .unwrap();
    assert_eq!((summary.loaded, summary.not_redrivable), (3, 3));
    assert!(
        bus.dead_letters().list()[0]
            .not_redrivable()
            .unwrap()
            .contains("no event type Numbered v1")
    );
    bus.dead_letters().purge();
    bus.upcast::<NumberedV2>(1, |old| {
        Ok(NumberedV2 {
            publisher: old["publisher"].as_u64().ok_or("no publisher")? as u32,
            seq: old["seq"].as_u64().ok_or("no seq")?,
            note: "from v1".to_owned(),
        })
    })
    .unwrap();
    let summary = bus
        .dead_letters()
        .load_json_lines(exported.as_bytes())
        .unwrap();
    assert_eq!((summary.loaded, summary.not_redrivable), (3, 0));
    assert_eq!(bus.dead_letters().redrive_all(), Ok(3));
    bus.flush(WAIT).unwrap();
    let mut seen = seen.lock().unwrap().clone();
    seen.sort_by_key(|e| e.seq);
    assert_eq!(
        seen,
        (0..3)
            .map(|seq| NumberedV2 {
                publisher: 0,
                seq,
                note: "from v1".to_owned()
            })
            .collect::<Vec<_>>()
    );
}

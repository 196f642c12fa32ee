//! Audit taps: every published event is seen once, whatever becomes of it, and a tap cannot
//! fail a delivery.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{FollowUp, Keyed, Numbered, WAIT, quiet_worker_panics};
use microbus::{Bus, Context, EventId, HandlerError, HandlerResult, Publish, RetryPolicy};

type Seen = Arc<Mutex<Vec<(&'static str, EventId, String)>>>;

fn tapped(bus: &Bus) -> Seen {
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    bus.tap(move |t| {
        log.lock()
            .unwrap()
            .push((t.event_name(), t.envelope().id(), t.payload_json()))
    });
    seen
}

#[test]
fn a_tap_sees_every_published_event_once() {
    let bus = Bus::builder()
        .workers(2)
        .retry(RetryPolicy::fixed(Duration::from_millis(1)).max_attempts(3))
        .build()
        .unwrap();
    let seen = tapped(&bus);
    // Two subscriptions on Numbered (one failing twice), follow-ups of a third type, and an
    // event type nobody subscribes to.
    bus.subscribe(|e: &Numbered, ctx: &Context| -> HandlerResult {
        ctx.publish(FollowUp {
            parent: e.seq,
            index: 0,
        })?;
        Ok(())
    })
    .unwrap();
    bus.subscribe(|_: &Numbered, ctx: &Context| -> HandlerResult {
        if ctx.attempt() < 3 {
            return Err(HandlerError::msg("flaky"));
        }
        Ok(())
    })
    .unwrap();
    bus.subscribe(|_: &FollowUp, _: &Context| -> HandlerResult { Ok(()) })
        .unwrap();
    for seq in 0..10 {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
        bus.publish(Keyed { key: seq, seq }).unwrap();
    }
    bus.publish_with(
        Numbered {
            publisher: 1,
            seq: 0,
        },
        Publish::new().delay(Duration::from_millis(5)),
    )
    .unwrap();
    bus.flush(WAIT).unwrap();

    let seen = seen.lock().unwrap();
    let mut by_type: HashMap<&str, usize> = HashMap::new();
    for (name, _, _) in seen.iter() {
        *by_type.entry(name).or_default() += 1;
    }
    assert_eq!(
        by_type["Numbered"], 11,
        "once each, retries not shown again"
    );
    assert_eq!(by_type["FollowUp"], 11);
    assert_eq!(by_type["Keyed"], 10, "unsubscribed events too");
    let mut ids: Vec<EventId> = seen.iter().map(|(_, id, _)| *id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), seen.len(), "every event once");
    let keyed: Vec<&str> = seen
        .iter()
        .filter(|s| s.0 == "Keyed")
        .map(|s| s.2.as_str())
        .collect();
    assert!(keyed.contains(&r#"{"key":3,"seq":3}"#), "{keyed:?}");
    assert_eq!(bus.stats().unmatched, 10);
}

#[test]
fn a_panicking_tap_fails_no_delivery() {
    quiet_worker_panics();
    let bus = Bus::builder().workers(1).build().unwrap();
    bus.tap(|_| panic!("the audit log is broken"));
    let handled = Arc::new(Mutex::new(0));
    {
        let handled = handled.clone();
        bus.subscribe(move |_: &Numbered, _: &Context| -> HandlerResult {
            *handled.lock().unwrap() += 1;
            Ok(())
        })
        .unwrap();
    }
    for seq in 0..5 {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    bus.flush(WAIT).unwrap();
    assert_eq!(*handled.lock().unwrap(), 5);
    assert_eq!(bus.tap_failures(), 5);
    assert_eq!(bus.stats().succeeded, 5);
}

#[test]
fn the_json_lines_tap_writes_one_line_per_event() {
    let path = std::env::temp_dir().join(format!(
        "microbus-tap-{}-{}.jsonl",
        std::process::id(),
        EventId::new()
    ));
    let bus = Bus::builder()
        .service_name("Orders")
        .workers(2)
        .build()
        .unwrap();
    bus.tap_json_lines(&path).unwrap();
    bus.subscribe(|_: &Numbered, _: &Context| -> HandlerResult { Ok(()) })
        .unwrap();
    for seq in 0..3 {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    bus.flush(WAIT).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    lines.sort_by_key(|l| l["payload"]["seq"].as_u64());
    assert_eq!(lines.len(), 3);
    for (seq, line) in lines.iter().enumerate() {
        assert_eq!(line["event"], "Numbered");
        assert_eq!(line["version"], 1);
        assert_eq!(line["payload"]["seq"], seq);
        assert_eq!(line["envelope"]["source"], "Orders");
        assert_eq!(line["envelope"]["id"], line["envelope"]["correlation_id"]);
    }
    assert_eq!(bus.tap_failures(), 0);
    std::fs::remove_file(&path).unwrap();
}

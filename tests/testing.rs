//! The test kit: `bus.record::<E>()` sees every event of a type, from every publisher, with
//! its envelope, whether anything subscribed to it or not.

mod common;

use std::time::Duration;

use common::{Keyed, Numbered, WAIT};
use microbus::{Bus, Context, HandlerResult, Publish};

#[test]
fn a_recorder_sees_every_event_of_its_type_from_every_publisher_in_order() {
    let bus = Bus::builder().workers(2).build().unwrap();
    let keyed = bus.record::<Keyed>();
    let numbered = bus.record::<Numbered>();
    // A handler that publishes a `Numbered` for each `Keyed`: nobody subscribes to those.
    bus.service("relay")
        .unwrap()
        .subscribe(|k: &Keyed, ctx: &Context| -> HandlerResult {
            ctx.publish(Numbered {
                publisher: 7,
                seq: k.seq,
            })?;
            Ok(())
        })
        .unwrap();
    let orders = bus.service("orders").unwrap();
    let mut ids = Vec::new();
    for seq in 0..100 {
        ids.push(
            orders
                .publish_with(Keyed { key: seq % 4, seq }, Publish::keyed(seq % 4))
                .unwrap(),
        );
    }
    bus.publish(Numbered {
        publisher: 1,
        seq: 0,
    })
    .unwrap();
    assert!(numbered.wait_for(101, WAIT));
    bus.flush(WAIT).unwrap();
    // Each key's events in publish order, with their envelopes.
    let recorded = keyed.recorded();
    assert_eq!(recorded.len(), 100);
    for key in 0..4 {
        let seqs: Vec<u64> = recorded
            .iter()
            .filter(|(k, _)| k.key == key)
            .map(|(k, _)| k.seq)
            .collect();
        assert_eq!(seqs, (key..100).step_by(4).collect::<Vec<_>>());
    }
    let mut seen_ids: Vec<_> = recorded.iter().map(|(_, e)| e.id()).collect();
    seen_ids.sort();
    ids.sort();
    assert_eq!(seen_ids, ids);
    assert!(recorded.iter().all(|(_, e)| e.source() == "orders"));
    // The handlers' events carry their cause.
    let relayed = numbered.recorded();
    assert_eq!(
        relayed.iter().filter(|(n, _)| n.publisher == 7).count(),
        100
    );
    assert!(
        relayed
            .iter()
            .filter(|(n, _)| n.publisher == 7)
            .all(|(_, e)| e.source() == "relay" && e.causation_id().is_some())
    );
    assert_eq!(numbered.envelopes().len(), 101);
    // Recording counts nothing: the ledger is what it would be without it.
    let stats = bus.stats();
    assert_eq!(
        (stats.delivered, stats.succeeded, stats.unmatched),
        (100, 100, 101)
    );
    assert!(bus.shutdown().unwrap().is_balanced());
}

#[test]
#[should_panic(expected = "expected no Numbered but 1 were published")]
fn assert_none_names_what_was_published() {
    let bus = Bus::builder().workers(1).build().unwrap();
    let numbered = bus.record::<Numbered>();
    numbered.assert_none();
    bus.publish(Numbered {
        publisher: 0,
        seq: 0,
    })
    .unwrap();
    bus.flush(WAIT).unwrap();
    numbered.assert_none();
}

#[test]
fn a_dropped_recorder_stops_recording_and_wait_for_times_out() {
    let bus = Bus::builder().workers(1).build().unwrap();
    let numbered = bus.record::<Numbered>();
    assert!(!numbered.wait_for(1, Duration::from_millis(10)));
    assert!(numbered.is_empty());
    drop(numbered);
    for seq in 0..10 {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    bus.flush(WAIT).unwrap();
    // A new recorder sees only what comes after it.
    let later = bus.record::<Numbered>();
    bus.publish(Numbered {
        publisher: 0,
        seq: 10,
    })
    .unwrap();
    assert!(later.wait_for(1, Duration::MAX));
    assert_eq!(later.events()[0].seq, 10);
    assert_eq!(later.len(), 1);
}

#[test]
fn a_handlers_event_that_nobody_hears_is_published_once_and_only_if_it_succeeds() {
    use microbus::{HandlerError, RetryPolicy};
    let bus = Bus::builder()
        .workers(1)
        .retry(RetryPolicy::fixed(Duration::from_millis(1)).max_attempts(3))
        .build()
        .unwrap();
    let numbered = bus.record::<Numbered>();
    // Stages an event no one subscribes to, then fails: twice for seq 0, always for seq 1.
    bus.subscribe(|k: &Keyed, ctx: &Context| -> HandlerResult {
        ctx.publish(Numbered {
            publisher: 3,
            seq: k.seq,
        })?;
        if k.seq == 1 || ctx.attempt() < 3 {
            return Err(HandlerError::msg("after staging"));
        }
        Ok(())
    })
    .unwrap();
    for seq in 0..2 {
        bus.publish(Keyed { key: 0, seq }).unwrap();
    }
    bus.flush(WAIT).unwrap();
    // Seq 0's third attempt published it; seq 1 never succeeded and published nothing.
    assert_eq!(
        numbered.events(),
        [Numbered {
            publisher: 3,
            seq: 0
        }]
    );
    let stats = bus.stats();
    assert_eq!(
        (stats.unmatched, stats.failed, stats.dead_lettered),
        (1, 5, 1)
    );
    let metrics = bus.metrics();
    let counts = metrics
        .events
        .iter()
        .find(|e| e.event == "Numbered")
        .unwrap();
    assert_eq!((counts.published, counts.unmatched), (1, 1));
}

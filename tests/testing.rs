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

#[test]
fn a_handlers_batch_that_nobody_hears_is_published_once_when_it_succeeds() {
    use common::FollowUp;
    use microbus::{HandlerError, RetryPolicy};
    let bus = Bus::builder()
        .workers(1)
        .retry(RetryPolicy::fixed(Duration::from_millis(1)).max_attempts(3))
        .build()
        .unwrap();
    let follow_ups = bus.record::<FollowUp>();
    bus.subscribe(|k: &Keyed, ctx: &Context| -> HandlerResult {
        ctx.publish_batch((0..3).map(|index| FollowUp {
            parent: k.seq,
            index,
        }))?;
        if ctx.attempt() == 1 {
            return Err(HandlerError::msg("after staging"));
        }
        Ok(())
    })
    .unwrap();
    bus.publish(Keyed { key: 0, seq: 9 }).unwrap();
    bus.flush(WAIT).unwrap();
    // Recorded by the time flush returns, once: the failed first attempt published nothing.
    let seen: Vec<u8> = follow_ups.events().iter().map(|f| f.index).collect();
    assert_eq!(seen, [0, 1, 2]);
    assert_eq!(bus.stats().unmatched, 3);
}

mod test_context {
    use super::*;
    use common::FollowUp;
    use microbus::testing::{Deferral, ManualClock, TestContext};
    use microbus::{Deferred, EventId, HandlerError};
    use std::sync::Mutex;

    #[test]
    fn a_handler_that_stages_two_events_and_defers() {
        let cause = EventId::new();
        let correlation = EventId::new();
        let mut ctx = TestContext::builder()
            .event_id(cause)
            .correlation_id(correlation)
            .source("orders")
            .key(42)
            .header("tenant", "acme")
            .attempt(3)
            .service("shipping")
            .handler("ship")
            .build();
        let kept: Mutex<Option<Deferred>> = Mutex::new(None);
        let seen = Mutex::new(None);
        ctx.call(&Keyed { key: 42, seq: 1 }, |k: &Keyed, c: &Context| {
            *seen.lock().unwrap() = Some((
                c.attempt(),
                c.source().to_owned(),
                c.service().to_owned(),
                c.handler_name().to_owned(),
                c.envelope().key().map(microbus::PartitionKey::get),
                c.envelope().headers().get("tenant").map(str::to_owned),
                c.deadline(),
            ));
            c.publish(FollowUp {
                parent: k.seq,
                index: 0,
            })?;
            c.publish_with(
                FollowUp {
                    parent: k.seq,
                    index: 1,
                },
                Publish::new().key(k.key).delay(Duration::from_secs(30)),
            )?;
            *kept.lock().unwrap() = Some(c.defer());
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen.lock().unwrap().take().unwrap(),
            (
                3,
                "orders".to_owned(),
                "shipping".to_owned(),
                "ship".to_owned(),
                Some(42),
                Some("acme".to_owned()),
                None
            )
        );
        assert_eq!(
            ctx.published::<FollowUp>(),
            [&FollowUp {
                parent: 1,
                index: 0
            }]
        );
        assert_eq!(
            ctx.delayed::<FollowUp>(),
            [(
                &FollowUp {
                    parent: 1,
                    index: 1
                },
                Duration::from_secs(30)
            )]
        );
        assert!(ctx.published::<Numbered>().is_empty());
        assert_eq!((ctx.published_count(), ctx.dropped()), (2, 0));
        for (_, envelope, _) in ctx.staged::<FollowUp>() {
            assert_eq!(envelope.correlation_id(), correlation);
            assert_eq!(envelope.causation_id(), Some(cause));
            assert_eq!(envelope.source(), "shipping");
        }
        assert_eq!(
            ctx.staged::<FollowUp>()[1]
                .1
                .key()
                .map(microbus::PartitionKey::get),
            Some(42)
        );
        assert_eq!(ctx.deferral(), Some(Deferral::Pending));
        kept.lock()
            .unwrap()
            .take()
            .unwrap()
            .fail(HandlerError::msg("carrier down"));
        assert_eq!(
            ctx.deferral(),
            Some(Deferral::Failed("carrier down".to_owned()))
        );
    }

    #[test]
    fn a_handler_that_fails_after_staging_publishes_nothing_and_its_deferral_does_not_count() {
        let mut ctx = TestContext::new();
        let result = ctx.call(
            &Numbered {
                publisher: 0,
                seq: 5,
            },
            |n: &Numbered, c: &Context| {
                c.publish(FollowUp {
                    parent: n.seq,
                    index: 0,
                })?;
                c.publish_batch((1..3).map(|index| FollowUp {
                    parent: n.seq,
                    index,
                }))?;
                let _dropped_later = c.defer();
                Err(HandlerError::msg("declined"))
            },
        );
        assert_eq!(result.unwrap_err().to_string(), "declined");
        assert!(ctx.published::<FollowUp>().is_empty());
        assert_eq!((ctx.published_count(), ctx.dropped()), (0, 3));
        assert_eq!(ctx.deferral(), None);
        // The next call that succeeds is kept; a deferral dropped uncompleted fails.
        ctx.call(
            &Numbered {
                publisher: 0,
                seq: 6,
            },
            |_: &Numbered, c: &Context| {
                drop(c.defer());
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(
            ctx.deferral(),
            Some(Deferral::Failed(
                "the deferred delivery was dropped without being completed".to_owned()
            ))
        );
    }

    #[test]
    fn a_deadline_is_read_from_the_test_clock() {
        let clock = ManualClock::new();
        let mut ctx = TestContext::builder()
            .clock(&clock)
            .timeout(Duration::from_secs(2))
            .build();
        let expired = |ctx: &mut TestContext| {
            let mut expired = None;
            ctx.call(
                &Numbered {
                    publisher: 0,
                    seq: 0,
                },
                |_: &Numbered, c: &Context| {
                    clock.advance(Duration::from_secs(1)).unwrap();
                    expired = Some(c.is_expired());
                    Ok(())
                },
            )
            .unwrap();
            expired.unwrap()
        };
        assert!(!expired(&mut ctx), "1 s of 2");
        clock.advance(Duration::from_secs(5)).unwrap();
        assert!(!expired(&mut ctx), "each call has its own deadline");
        // Ids of staged events come from the clock too.
        ctx.call(
            &Numbered {
                publisher: 0,
                seq: 1,
            },
            |_: &Numbered, c: &Context| {
                c.publish(FollowUp {
                    parent: 1,
                    index: 0,
                })?;
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(ctx.staged::<FollowUp>()[0].1.published_at(), clock.now());
    }
}

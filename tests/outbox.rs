//! Publishing from handlers: correlation and causation flow, the outbox publishes only on
//! success, and follow-ups never deadlock a full bus.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::{FollowUp, Numbered, Tally, WAIT, count};
use microbus::{Bus, Context, Event, EventId, HandlerError, HandlerResult, RetryPolicy};
use serde::{Deserialize, Serialize};

macro_rules! hop {
    ($name:ident) => {
        #[derive(Debug, Clone, Serialize, Deserialize)]
        struct $name {
            order: u64,
        }
        impl Event for $name {
            const NAME: &'static str = stringify!($name);
        }
    };
}
hop!(Hop1);
hop!(Hop2);
hop!(Hop3);

type Seen = Arc<
    Mutex<
        Vec<(
            &'static str,
            EventId,
            EventId,
            Option<EventId>,
            &'static str,
        )>,
    >,
>;

fn record(seen: &Seen, hop: &'static str, ctx: &Context<'_>) {
    seen.lock().unwrap().push((
        hop,
        ctx.event_id(),
        ctx.correlation_id(),
        ctx.causation_id(),
        ctx.source(),
    ));
}

#[test]
fn a_three_hop_chain_shares_one_correlation_and_links_causes() {
    let bus = Bus::builder().workers(3).build().unwrap();
    let a = bus.service("A").unwrap();
    let b = bus.service("B").unwrap();
    let c = bus.service("C").unwrap();
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    {
        let seen = seen.clone();
        b.subscribe_from("A", move |e: &Hop1, ctx: &Context| -> HandlerResult {
            record(&seen, "hop1", ctx);
            ctx.publish(Hop2 { order: e.order })?;
            Ok(())
        })
        .unwrap();
    }
    {
        let seen = seen.clone();
        c.subscribe_from("B", move |e: &Hop2, ctx: &Context| -> HandlerResult {
            record(&seen, "hop2", ctx);
            ctx.publish(Hop3 { order: e.order })?;
            Ok(())
        })
        .unwrap();
    }
    {
        let seen = seen.clone();
        a.subscribe_from("C", move |_: &Hop3, ctx: &Context| -> HandlerResult {
            record(&seen, "hop3", ctx);
            Ok(())
        })
        .unwrap();
    }
    a.publish(Hop1 { order: 1 }).unwrap();
    bus.flush(WAIT).unwrap();
    let mut seen = seen.lock().unwrap().clone();
    seen.sort_by_key(|s| s.0);
    assert_eq!(seen.len(), 3);
    let (_, id1, corr1, cause1, src1) = seen[0];
    let (_, id2, corr2, cause2, src2) = seen[1];
    let (_, id3, corr3, cause3, src3) = seen[2];
    assert_eq!(corr1, id1);
    assert_eq!(cause1, None);
    assert_eq!((corr2, cause2), (id1, Some(id1)));
    assert_eq!((corr3, cause3), (id1, Some(id2)));
    assert_eq!((src1, src2, src3), ("A", "B", "C"));
    assert!(id1 < id2 && id2 < id3, "ids sort in causal order here");
}

#[test]
fn a_failing_handler_publishes_nothing() {
    let bus = Bus::builder()
        .workers(1)
        .retry(RetryPolicy::none())
        .build()
        .unwrap();
    let follow_ups = Arc::new(AtomicU64::new(0));
    {
        let follow_ups = follow_ups.clone();
        bus.subscribe(move |_: &FollowUp, _: &Context| -> HandlerResult {
            follow_ups.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
    }
    let sub = bus
        .subscribe(|e: &Numbered, ctx: &Context| -> HandlerResult {
            ctx.publish(FollowUp {
                parent: e.seq,
                index: 0,
            })?;
            ctx.publish(FollowUp {
                parent: e.seq,
                index: 1,
            })?;
            if e.seq == 0 {
                return Err(HandlerError::msg("declined after staging"));
            }
            panic!("panicked after staging");
        })
        .unwrap();
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    bus.publish(Numbered {
        publisher: 0,
        seq: 0,
    })
    .unwrap();
    bus.publish(Numbered {
        publisher: 0,
        seq: 1,
    })
    .unwrap();
    let flushed = bus.flush(WAIT);
    std::panic::set_hook(quiet);
    flushed.unwrap();
    assert_eq!(count(&follow_ups), 0);
    let stats = bus.stats();
    assert_eq!((stats.delivered, stats.failed, stats.panicked), (2, 2, 1));
    assert_eq!(stats.dead_lettered, 2);
    assert_eq!(stats.unmatched, 0);
    assert_eq!(
        sub.stats().last_error.as_deref(),
        Some("handler panicked: panicked after staging")
    );
}

fn follow_ups_through_a_full_bus(events: u64, spill_capacity: Option<usize>) {
    let mut builder = Bus::builder().workers(1).channel_capacity(1);
    if let Some(spill) = spill_capacity {
        builder = builder.spill_capacity(spill);
    }
    let bus = builder.build().unwrap();
    let tally = Arc::new(Tally::new(2 * events as usize));
    {
        let tally = tally.clone();
        bus.subscribe(move |e: &FollowUp, _: &Context| -> HandlerResult {
            tally.mark((2 * e.parent + u64::from(e.index)) as usize);
            Ok(())
        })
        .unwrap();
    }
    bus.subscribe(|e: &Numbered, ctx: &Context| -> HandlerResult {
        ctx.publish(FollowUp {
            parent: e.seq,
            index: 0,
        })?;
        ctx.publish(FollowUp {
            parent: e.seq,
            index: 1,
        })?;
        Ok(())
    })
    .unwrap();
    for seq in 0..events {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    bus.flush(WAIT).unwrap();
    assert_eq!(tally.not_once(), vec![]);
    let report = bus.shutdown().unwrap();
    assert_eq!(report.stats.delivered, 3 * events);
    assert_eq!(report.stats.succeeded, 3 * events);
    assert!(report.is_balanced(), "{report}");
}

#[test]
fn follow_ups_complete_with_one_worker_and_capacity_one() {
    follow_ups_through_a_full_bus(2_000, None);
}

#[test]
fn follow_ups_wait_on_the_timer_when_the_spill_queue_is_full() {
    follow_ups_through_a_full_bus(2_000, Some(0));
}

#[test]
fn publishing_through_a_captured_handle_never_blocks_a_worker() {
    const EVENTS: u64 = 500;
    let bus = Bus::builder()
        .workers(1)
        .channel_capacity(1)
        .build()
        .unwrap();
    let follow_ups = Arc::new(AtomicU64::new(0));
    {
        let follow_ups = follow_ups.clone();
        bus.subscribe(move |_: &FollowUp, _: &Context| -> HandlerResult {
            follow_ups.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
    }
    {
        let captured = bus.clone();
        bus.subscribe(move |e: &Numbered, _: &Context| -> HandlerResult {
            captured.publish(FollowUp {
                parent: e.seq,
                index: 0,
            })?;
            Ok(())
        })
        .unwrap();
    }
    for seq in 0..EVENTS {
        bus.publish(Numbered { publisher: 0, seq }).unwrap();
    }
    bus.flush(WAIT).unwrap();
    assert_eq!(count(&follow_ups), EVENTS);
    let report = bus.shutdown().unwrap();
    assert_eq!(report.stats.delivered, 2 * EVENTS);
    assert!(report.is_balanced());
}

#[test]
fn options_set_on_a_handler_s_publish_win_over_the_inherited_ones() {
    let bus = Bus::builder().workers(1).build().unwrap();
    let chosen = EventId::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    {
        let seen = seen.clone();
        bus.subscribe(move |_: &FollowUp, ctx: &Context| -> HandlerResult {
            seen.lock().unwrap().push((
                ctx.correlation_id(),
                ctx.causation_id(),
                ctx.envelope().headers().get("why").map(str::to_owned),
            ));
            Ok(())
        })
        .unwrap();
    }
    let parent = Arc::new(Mutex::new(None));
    {
        let parent = parent.clone();
        bus.subscribe(move |e: &Numbered, ctx: &Context| -> HandlerResult {
            *parent.lock().unwrap() = Some(ctx.event_id());
            ctx.publish_with(
                FollowUp {
                    parent: e.seq,
                    index: 0,
                },
                microbus::Publish::new()
                    .correlation(chosen)
                    .header("why", "audit"),
            )?;
            Ok(())
        })
        .unwrap();
    }
    bus.publish(Numbered {
        publisher: 0,
        seq: 0,
    })
    .unwrap();
    bus.flush(WAIT).unwrap();
    let parent = parent.lock().unwrap().unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(chosen, Some(parent), Some("audit".to_owned()))]
    );
}

//! Correlation traces: the deliveries of one conversation, printed as a causal tree.

mod common;

use std::time::Duration;

use common::{FollowUp, Keyed, Numbered, WAIT};
use microbus::{Bus, Context, EventId, HandlerError, HandlerResult, RetryPolicy, TraceOutcome};

#[test]
fn a_trace_is_the_conversation_as_a_tree() {
    let bus = Bus::builder()
        .workers(2)
        .trace_capacity(100)
        .retry(RetryPolicy::fixed(Duration::from_millis(1)).max_attempts(2))
        .build()
        .unwrap();
    let shipping = bus.service("Shipping").unwrap();
    bus.subscribe(|e: &Numbered, ctx: &Context| -> HandlerResult {
        ctx.publish(Keyed { key: e.seq, seq: 1 })?;
        Ok(())
    })
    .unwrap();
    shipping
        .subscribe(|e: &Keyed, ctx: &Context| -> HandlerResult {
            if ctx.attempt() == 1 {
                return Err(HandlerError::msg("carrier busy"));
            }
            ctx.publish(FollowUp {
                parent: e.key,
                index: 0,
            })?;
            Ok(())
        })
        .unwrap();
    bus.subscribe(|_: &FollowUp, _: &Context| -> HandlerResult { Ok(()) })
        .unwrap();
    let trace_id = EventId::new();
    bus.publish_with(
        Numbered {
            publisher: 0,
            seq: 7,
        },
        microbus::Publish::new().correlation(trace_id),
    )
    .unwrap();
    // Another conversation that must not show up.
    bus.publish(Numbered {
        publisher: 0,
        seq: 8,
    })
    .unwrap();
    bus.flush(WAIT).unwrap();

    let trace = bus.trace(trace_id);
    assert_eq!(trace.events().len(), 3);
    assert_eq!(trace.entries.len(), 4, "the second hop ran twice");
    let names: Vec<&str> = trace.entries.iter().map(|e| e.event).collect();
    assert_eq!(names, ["Numbered", "Keyed", "Keyed", "FollowUp"]);
    assert_eq!(
        trace.entries[1].outcome,
        TraceOutcome::Failed("carrier busy".to_owned())
    );
    assert_eq!((trace.entries[1].attempt, trace.entries[2].attempt), (1, 2));
    assert_eq!(trace.entries[2].service, "Shipping");
    assert_eq!(
        trace.entries[1].causation_id,
        Some(trace.entries[0].event_id)
    );
    assert_eq!(
        trace.entries[3].causation_id,
        Some(trace.entries[1].event_id)
    );

    let printed = trace.to_string();
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), 7, "{printed}");
    assert!(lines[0].starts_with("Numbered "), "{printed}");
    assert!(lines[2].starts_with("    Keyed "), "{printed}");
    assert!(lines[3].contains("failed: carrier busy"), "{printed}");
    assert!(lines[5].starts_with("        FollowUp "), "{printed}");
}

#[test]
fn traces_are_off_unless_asked_for_and_bounded() {
    let off = Bus::builder().workers(1).build().unwrap();
    off.subscribe(|_: &Numbered, _: &Context| -> HandlerResult { Ok(()) })
        .unwrap();
    off.publish(Numbered {
        publisher: 0,
        seq: 0,
    })
    .unwrap();
    off.flush(WAIT).unwrap();
    assert!(off.trace(EventId::new()).entries.is_empty());

    let bus = Bus::builder().workers(1).trace_capacity(3).build().unwrap();
    bus.subscribe(|_: &Numbered, _: &Context| -> HandlerResult { Ok(()) })
        .unwrap();
    let trace_id = EventId::new();
    for seq in 0..5 {
        bus.publish_with(
            Numbered { publisher: 0, seq },
            microbus::Publish::new().correlation(trace_id),
        )
        .unwrap();
    }
    bus.flush(WAIT).unwrap();
    assert_eq!(bus.trace(trace_id).entries.len(), 3, "the newest three");
}

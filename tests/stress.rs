//! Everything at once — backpressure, keyed and unkeyed events, follow-ups, failures, panics,
//! retries, an unsubscribe mid-stream and a shutdown while publishers are still running — with exact
//! accounting at the end. Sized to run in seconds; `MICROBUS_STRESS_EVENTS` makes it bigger.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{FollowUp, Numbered, Tally, count, quiet_worker_panics};
use microbus::{Bus, Context, HandlerError, HandlerResult, Publish, PublishError, RetryPolicy};

fn events_per_publisher() -> u64 {
    std::env::var("MICROBUS_STRESS_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30_000)
}

#[test]
fn mixed_load_with_shutdown_mid_stream_adds_up() {
    const PUBLISHERS: u32 = 3;
    let per_publisher = events_per_publisher();
    let total = PUBLISHERS as usize * per_publisher as usize;
    let index = move |e: &Numbered| (u64::from(e.publisher) * per_publisher + e.seq) as usize;
    quiet_worker_panics();

    let bus = Bus::builder()
        .workers(4)
        .channel_capacity(8)
        .spill_capacity(4)
        .shutdown_timeout(Duration::from_secs(20))
        .retry(RetryPolicy::fixed(Duration::from_millis(1)).max_attempts(3))
        .build()
        .unwrap();

    // S1 always succeeds and publishes a follow-up for every third event.
    let s1_calls = Arc::new(Tally::new(total));
    let follow_ups_staged = Arc::new(AtomicU64::new(0));
    {
        let (calls, staged) = (s1_calls.clone(), follow_ups_staged.clone());
        bus.subscribe(move |e: &Numbered, ctx: &Context| -> HandlerResult {
            calls.mark(index(e));
            if e.seq.is_multiple_of(3) {
                ctx.publish(FollowUp {
                    parent: index(e) as u64,
                    index: 0,
                })?;
                staged.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })
        .unwrap();
    }
    // S2 fails 5% of its deliveries and panics on 1%, on every attempt: each of those is
    // tried 3 times, then dead-lettered.
    let s2_calls = Arc::new(Tally::new(total));
    {
        let calls = s2_calls.clone();
        bus.subscribe(move |e: &Numbered, _: &Context| -> HandlerResult {
            calls.mark(index(e));
            match e.seq % 100 {
                0 => panic!("unlucky {}", e.seq),
                1..=5 => Err(HandlerError::msg("declined")),
                _ => Ok(()),
            }
        })
        .unwrap();
    }
    // S3 handles the follow-ups.
    let s3_calls = Arc::new(Tally::new(total));
    {
        let calls = s3_calls.clone();
        bus.subscribe(move |e: &FollowUp, _: &Context| -> HandlerResult {
            calls.mark(e.parent as usize);
            Ok(())
        })
        .unwrap();
    }
    // S4 is unsubscribed while events flow.
    let s4_calls = Arc::new(AtomicU64::new(0));
    let s4 = {
        let calls = s4_calls.clone();
        bus.subscribe(move |_: &Numbered, _: &Context| -> HandlerResult {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap()
    };

    let accepted = Arc::new(AtomicU64::new(0));
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|publisher| {
            let (bus, accepted) = (bus.clone(), accepted.clone());
            std::thread::spawn(move || {
                let mut returned = Vec::new();
                for seq in 0..per_publisher {
                    let event = Numbered { publisher, seq };
                    let options = if seq % 2 == 0 {
                        Publish::keyed(seq % 17)
                    } else {
                        Publish::new()
                    };
                    match bus.publish_with(event, options) {
                        Ok(_id) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(PublishError::Shutdown(e)) => returned.push(e),
                        Err(_) => unreachable!("not a rayon thread"),
                    }
                }
                returned
            })
        })
        .collect();

    let third = total as u64 / 3;
    while count(&accepted) < third {
        std::thread::yield_now();
    }
    s4.unsubscribe();
    let s4_at_unsubscribe = count(&s4_calls);
    while count(&accepted) < 2 * third {
        std::thread::yield_now();
    }
    let report = bus.shutdown().unwrap();
    let returned: Vec<Numbered> = publishers
        .into_iter()
        .flat_map(|p| p.join().unwrap())
        .collect();

    eprintln!("returned {} of {total} events at shutdown", returned.len());
    // Every event was accepted or returned, never both.
    let returned_set: HashSet<usize> = returned.iter().map(index).collect();
    assert_eq!(returned_set.len(), returned.len());
    assert_eq!(count(&accepted) as usize + returned.len(), total);
    assert_eq!(bus.stats().refused, returned.len() as u64);
    // Accepted events reached S1 and S2 exactly once (everything finished before the deadline);
    // returned ones reached nobody.
    assert!(!report.deadline_passed, "{report}");
    let failing = |i: usize| ((i as u64 % per_publisher) % 100) <= 5;
    for i in 0..total {
        let accepted = !returned_set.contains(&i);
        assert_eq!(s1_calls.get(i), u8::from(accepted), "S1, event {i}");
        let attempts = if failing(i) { 3 } else { 1 };
        assert_eq!(
            s2_calls.get(i),
            u8::from(accepted) * attempts,
            "S2, event {i}"
        );
    }
    // Every follow-up S1 staged was handled once by S3.
    let follow_ups: u64 = (0..total).map(|i| u64::from(s3_calls.get(i))).sum();
    assert_eq!(follow_ups, count(&follow_ups_staged));
    assert!(s3_calls.not_once().iter().all(|&(_, c)| c == 0));
    // No call of S4 started after unsubscribe returned; its queued deliveries were cancelled.
    assert_eq!(count(&s4_calls), s4_at_unsubscribe);
    assert_eq!(report.stats.cancelled, s4.stats().cancelled);

    let a = count(&accepted);
    let accepted_failing = |panics: bool| {
        (0..total)
            .filter(|&i| !returned_set.contains(&i) && failing(i))
            .filter(|&i| (i as u64 % per_publisher).is_multiple_of(100) == panics)
            .count() as u64
    };
    let (s2_failures, s2_panics) = (accepted_failing(false), accepted_failing(true));
    let stats = &report.stats;
    assert_eq!(stats.panicked, 3 * s2_panics);
    assert_eq!(stats.failed, 3 * (s2_failures + s2_panics));
    assert_eq!(stats.retried, 2 * (s2_failures + s2_panics));
    assert_eq!(stats.dead_lettered, s2_failures + s2_panics);
    assert_eq!(
        stats.succeeded,
        2 * a - s2_failures - s2_panics + s4_at_unsubscribe + follow_ups
    );
    assert_eq!(
        stats.delivered,
        2 * a + s4_at_unsubscribe + stats.cancelled + follow_ups
    );
    assert_eq!((stats.left, stats.abandoned, stats.in_flight), (0, 0, 0));
    assert!(report.is_balanced(), "{report}");
}

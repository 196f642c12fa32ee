//! Deferred deliveries: a handler calls `ctx.defer()`, returns, and another thread settles the
//! delivery later — succeeded, retried (the handler runs again), dead-lettered, discarded, or
//! abandoned at the shutdown deadline — exactly once, with flush, trackers and the ledger
//! waiting for it.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{FollowUp, Numbered, Tally, WAIT, quiet_worker_panics};
use crossbeam_channel::{Receiver, Sender};
use microbus::{
    Bus, BusBuilder, Context, DeadLetterReason, Deferred, HandlerError, HandlerResult, Publish,
    RetryPolicy, TraceOutcome,
};

/// One deferral on its way to a completer: the event's `seq`, the attempt, the handle.
type Job = (u64, u32, Deferred);

/// Subscribes a handler that defers every delivery to `tx`, counting its calls.
fn defer_all(bus: &Bus, tx: Sender<Job>, calls: Arc<AtomicU64>) {
    bus.subscribe(move |e: &Numbered, ctx: &Context| -> HandlerResult {
        calls.fetch_add(1, Ordering::Relaxed);
        tx.send((e.seq, ctx.attempt(), ctx.defer()))
            .map_err(|_| HandlerError::msg("no completer"))?;
        Ok(())
    })
    .unwrap();
}

/// A bus built by `builder` whose handler defers every delivery to the returned receiver.
fn deferring(builder: BusBuilder) -> (Bus, Receiver<Job>) {
    let bus = builder.build().unwrap();
    let (tx, rx) = crossbeam_channel::unbounded();
    defer_all(&bus, tx, Arc::default());
    (bus, rx)
}

/// Event `seq` of publisher 0.
fn numbered(seq: u64) -> Numbered {
    Numbered { publisher: 0, seq }
}

/// A thread that completes each deferral with `decide(seq, attempt)`, in batches as they come.
fn completer(
    rx: Receiver<Job>,
    decide: impl Fn(u64, u32) -> HandlerResult + Send + 'static,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut completed = 0;
        while let Ok(first) = rx.recv() {
            let batch: Vec<Job> = std::iter::once(first)
                .chain(rx.try_iter().take(63))
                .collect();
            for (seq, attempt, done) in batch {
                done.complete(decide(seq, attempt));
                completed += 1;
            }
        }
        completed
    })
}

#[test]
fn deferred_deliveries_settle_from_another_thread() {
    const N: u64 = 10_000;
    let bus = Bus::builder().workers(2).build().unwrap();
    let (tx, rx) = crossbeam_channel::bounded(1024);
    let calls = Arc::new(AtomicU64::new(0));
    defer_all(&bus, tx, calls.clone());
    let tally = Arc::new(Tally::new(N as usize));
    let done = {
        let tally = tally.clone();
        completer(rx, move |seq, _| {
            tally.mark(seq as usize);
            Ok(())
        })
    };
    for seq in 0..N {
        bus.publish(numbered(seq)).unwrap();
    }
    bus.flush(WAIT).unwrap();
    // Flush waited for the completions, not just the handlers.
    assert_eq!(tally.not_once(), vec![]);
    let stats = bus.stats();
    assert_eq!((stats.delivered, stats.succeeded), (N, N));
    assert_eq!((stats.failed, stats.in_flight), (0, 0));
    let handler = &bus.metrics().handlers[0];
    assert_eq!((handler.delivered, handler.succeeded), (N, N));
    let report = bus.shutdown().unwrap();
    assert!(report.is_balanced(), "{report:?}");
    assert_eq!(report.stats.succeeded, N);
    assert_eq!(calls.load(Ordering::Relaxed), N);
    drop(bus);
    assert_eq!(done.join().unwrap(), N);
}

#[test]
fn flush_and_trackers_wait_for_a_deferral() {
    let (bus, rx) = deferring(Bus::builder().workers(1));
    let tracker = bus
        .publish_with(numbered(1), Publish::new().tracked())
        .unwrap();
    let (_, attempt, done) = rx.recv_timeout(WAIT).unwrap();
    assert_eq!(attempt, 1);
    // The handler has returned; the delivery is still outstanding.
    let err = bus.flush(Duration::from_millis(50)).unwrap_err();
    assert_eq!(err.pending().map(|p| (p.running, p.deferred)), Some((0, 1)));
    assert!(err.to_string().contains("1 deferred"), "{err}");
    assert_eq!(bus.stats().in_flight, 1);
    assert_eq!(tracker.completion(), None);
    done.succeed();
    let completion = tracker.wait(WAIT).expect("completes");
    assert_eq!((completion.deliveries, completion.succeeded), (1, 1));
    bus.flush(WAIT).unwrap();
    assert_eq!(bus.stats().succeeded, 1);
}

#[test]
fn a_failed_deferral_runs_the_handler_again_until_it_succeeds() {
    const N: u64 = 2_000;
    let bus = Bus::builder()
        .workers(2)
        .retry(RetryPolicy::fixed(Duration::from_millis(1)).max_attempts(3))
        .build()
        .unwrap();
    let (tx, rx) = crossbeam_channel::bounded(256);
    let calls = Arc::new(AtomicU64::new(0));
    defer_all(&bus, tx, calls.clone());
    let attempts: Arc<Mutex<HashMap<u64, Vec<u32>>>> = Arc::default();
    let done = {
        let attempts = attempts.clone();
        completer(rx, move |seq, attempt| {
            attempts
                .lock()
                .unwrap()
                .entry(seq)
                .or_default()
                .push(attempt);
            // Fails the first two attempts of odd events, succeeds the rest.
            if seq % 2 == 1 && attempt < 3 {
                return Err(HandlerError::msg(format!("attempt {attempt}")));
            }
            Ok(())
        })
    };
    for seq in 0..N {
        bus.publish(numbered(seq)).unwrap();
    }
    bus.flush(WAIT).unwrap();
    let stats = bus.stats();
    assert_eq!(stats.succeeded, N);
    assert_eq!(stats.failed, N); // Two failures for each of N / 2 odd events.
    assert_eq!(stats.retried, N);
    assert_eq!(stats.dead_lettered, 0);
    assert_eq!(calls.load(Ordering::Relaxed), N + N);
    let attempts = attempts.lock().unwrap();
    assert_eq!(attempts.len() as u64, N);
    for (seq, seen) in attempts.iter() {
        let want: &[u32] = if seq % 2 == 1 { &[1, 2, 3] } else { &[1] };
        assert_eq!(seen, want, "event {seq}");
    }
    let handler = &bus.metrics().handlers[0];
    assert_eq!((handler.failed, handler.retried), (N, N));
    drop(bus);
    assert_eq!(done.join().unwrap(), 2 * N);
}

#[test]
fn a_deferral_that_keeps_failing_is_dead_lettered_with_every_error() {
    let (bus, rx) = deferring(
        Bus::builder()
            .workers(1)
            .retry(RetryPolicy::fixed(Duration::from_millis(1)).max_attempts(3)),
    );
    let done = completer(rx, |seq, attempt| match seq {
        0 => Err(HandlerError::msg(format!("down {attempt}"))),
        _ => Err(HandlerError::permanent(HandlerError::msg("refused"))),
    });
    bus.publish(numbered(0)).unwrap();
    bus.publish(numbered(1)).unwrap();
    bus.flush(WAIT).unwrap();
    let mut letters = bus.dead_letters().list();
    letters.sort_by_key(|l| l.errors().len());
    assert_eq!(letters.len(), 2);
    assert_eq!(letters[0].reason(), DeadLetterReason::Permanent);
    assert_eq!(letters[0].errors(), ["refused"]);
    assert_eq!(letters[1].reason(), DeadLetterReason::RetriesExhausted);
    assert_eq!(letters[1].errors(), ["down 1", "down 2", "down 3"]);
    assert_eq!(letters[1].attempts(), 3);
    let stats = bus.stats();
    assert_eq!(
        (stats.dead_lettered, stats.failed, stats.retried),
        (2, 4, 2)
    );
    assert!(stats.is_balanced(), "{stats:?}");
    // A dead letter holds its subscription (to redrive it), and the handler holds `tx`.
    drop((letters, bus));
    assert_eq!(done.join().unwrap(), 4);
}

#[test]
fn a_redriven_dead_letter_defers_again() {
    let (bus, rx) = deferring(Bus::builder().workers(1).retry(RetryPolicy::none()));
    bus.publish(numbered(7)).unwrap();
    let (_, _, first) = rx.recv_timeout(WAIT).unwrap();
    first.fail(HandlerError::msg("not yet"));
    bus.flush(WAIT).unwrap();
    let letter = bus.dead_letters().list().pop().expect("dead-lettered");
    assert_eq!(letter.errors(), ["not yet"]);
    bus.dead_letters().redrive(letter.id()).unwrap();
    let (seq, attempt, again) = rx.recv_timeout(WAIT).unwrap();
    assert_eq!((seq, attempt), (7, 1));
    assert!(bus.flush(Duration::from_millis(20)).is_err());
    again.succeed();
    bus.flush(WAIT).unwrap();
    assert_eq!(bus.dead_letters().len(), 0);
    let stats = bus.stats();
    assert_eq!((stats.succeeded, stats.dead_lettered), (1, 1));
}

#[test]
fn dropping_a_deferral_fails_the_delivery() {
    let (bus, rx) = deferring(Bus::builder().workers(1).retry(RetryPolicy::none()));
    bus.publish(numbered(0)).unwrap();
    drop(rx.recv_timeout(WAIT).unwrap());
    bus.flush(WAIT).unwrap();
    let letter = bus.dead_letters().list().pop().expect("dead-lettered");
    assert_eq!(
        letter.errors(),
        ["the deferred delivery was dropped without being completed"]
    );
    // With dead letters off, it is discarded and still settled once.
    let (off, rx) = deferring(
        Bus::builder()
            .workers(1)
            .retry(RetryPolicy::none())
            .dead_letter_capacity(0),
    );
    off.publish(numbered(0)).unwrap();
    drop(rx.recv_timeout(WAIT).unwrap());
    off.flush(WAIT).unwrap();
    let stats = off.stats();
    assert_eq!((stats.discarded, stats.failed, stats.in_flight), (1, 1, 0));
}

#[test]
fn a_handler_that_fails_after_deferring_fails_the_attempt_and_the_deferral_is_void() {
    quiet_worker_panics();
    let bus = Bus::builder()
        .workers(1)
        .retry(RetryPolicy::fixed(Duration::from_millis(1)).max_attempts(2))
        .build()
        .unwrap();
    let kept: Arc<Mutex<Vec<Deferred>>> = Arc::default();
    {
        let kept = kept.clone();
        bus.subscribe(move |e: &Numbered, ctx: &Context| -> HandlerResult {
            let done = ctx.defer();
            if ctx.attempt() == 1 {
                kept.lock().unwrap().push(done);
                if e.seq == 0 {
                    return Err(HandlerError::msg("after deferring"));
                }
                panic!("after deferring");
            }
            // The second attempt completes its deferral before it returns.
            done.succeed();
            Ok(())
        })
        .unwrap();
    }
    bus.publish(numbered(0)).unwrap();
    bus.publish(numbered(1)).unwrap();
    bus.flush(WAIT).unwrap();
    // The first attempts' deferrals do nothing now, succeed or fail.
    let mut kept = std::mem::take(&mut *kept.lock().unwrap());
    kept.pop().unwrap().fail(HandlerError::msg("ignored"));
    kept.pop().unwrap().succeed();
    bus.flush(WAIT).unwrap();
    let stats = bus.stats();
    assert_eq!(stats.succeeded, 2);
    assert_eq!((stats.failed, stats.panicked, stats.retried), (2, 1, 2));
    assert_eq!(stats.dead_lettered, 0);
    assert_eq!(stats.delivered, 2);
}

/// What a deferring handler publishes leaves when it returns: the follow-up is handled while
/// the deferred delivery is still outstanding.
#[test]
fn a_deferring_handler_publishes_when_it_returns() {
    let bus = Bus::builder().workers(1).build().unwrap();
    let (tx, rx) = crossbeam_channel::unbounded();
    bus.subscribe(move |e: &Numbered, ctx: &Context| -> HandlerResult {
        ctx.publish(FollowUp {
            parent: e.seq,
            index: 0,
        })?;
        tx.send(ctx.defer()).unwrap();
        Ok(())
    })
    .unwrap();
    let (seen_tx, seen_rx) = crossbeam_channel::unbounded();
    bus.subscribe(move |e: &FollowUp, _: &Context| -> HandlerResult {
        seen_tx.send(e.parent).unwrap();
        Ok(())
    })
    .unwrap();
    bus.publish(numbered(9)).unwrap();
    let deferred = rx.recv_timeout(WAIT).unwrap();
    assert_eq!(seen_rx.recv_timeout(WAIT).unwrap(), 9);
    let waiting = bus.flush(Duration::from_millis(50)).unwrap_err();
    assert_eq!(waiting.pending().map(|p| p.deferred), Some(1));
    deferred.succeed();
    bus.flush(WAIT).unwrap();
    assert_eq!(bus.stats().succeeded, 2);
}

#[test]
fn deferring_twice_fails_the_attempt() {
    quiet_worker_panics();
    let bus = Bus::builder()
        .workers(1)
        .retry(RetryPolicy::none())
        .build()
        .unwrap();
    bus.subscribe(|_: &Numbered, ctx: &Context| -> HandlerResult {
        let first = ctx.defer();
        let _second = ctx.defer();
        first.succeed();
        Ok(())
    })
    .unwrap();
    bus.publish(numbered(0)).unwrap();
    bus.flush(WAIT).unwrap();
    let letter = bus.dead_letters().list().pop().expect("dead-lettered");
    assert!(letter.errors()[0].contains("called twice"), "{letter:?}");
    assert_eq!(bus.stats().succeeded, 0);
}

#[test]
fn a_deferral_never_completed_is_abandoned_at_the_shutdown_deadline() {
    let (bus, rx) = deferring(
        Bus::builder()
            .workers(1)
            .shutdown_timeout(Duration::from_millis(100))
            .trace_capacity(16),
    );
    let tracker = bus
        .publish_with(numbered(0), Publish::new().tracked())
        .unwrap();
    bus.publish(numbered(1)).unwrap();
    let (_, _, kept) = rx.recv_timeout(WAIT).unwrap();
    let (_, _, completed) = rx.recv_timeout(WAIT).unwrap();
    completed.succeed();
    let report = bus.shutdown().unwrap();
    assert!(report.deadline_passed);
    assert!(report.is_balanced(), "{report:?}");
    assert_eq!((report.stats.succeeded, report.stats.abandoned), (1, 1));
    assert_eq!(report.abandoned.len(), 1);
    let abandoned = &report.abandoned[0];
    assert_eq!(abandoned.worker, "deferred");
    assert_eq!(abandoned.event, "Numbered");
    assert_eq!(abandoned.event_id, Some(tracker.event_id()));
    assert_eq!(tracker.completion().map(|c| c.abandoned), Some(1));
    // Completing it now changes nothing.
    kept.succeed();
    assert_eq!(bus.stats().succeeded, 1);
    let traced = bus.trace(tracker.event_id());
    assert_eq!(traced.entries[0].outcome, TraceOutcome::Deferred);
}

/// Publishers and completers on several threads, single and batched publishes, random
/// failures: every event succeeds exactly once, and the counts add up.
#[test]
fn concurrent_deferrals_settle_each_delivery_exactly_once() {
    const PER: u64 = 10_000;
    const PUBLISHERS: u64 = 2;
    let n = PER * PUBLISHERS;
    let bus = Bus::builder()
        .workers(2)
        .channel_capacity(64)
        .retry(RetryPolicy::fixed(Duration::from_micros(100)).max_attempts(10))
        .build()
        .unwrap();
    let (tx, rx) = crossbeam_channel::bounded(128);
    let calls = Arc::new(AtomicU64::new(0));
    defer_all(&bus, tx, calls.clone());
    let tally = Arc::new(Tally::new(n as usize));
    let failures = Arc::new(AtomicU64::new(0));
    let completers: Vec<_> = (0..2)
        .map(|_| {
            let (tally, failures) = (tally.clone(), failures.clone());
            completer(rx.clone(), move |seq, attempt| {
                // About one attempt in seven fails, never the last allowed.
                if attempt < 10 && (seq * 31 + u64::from(attempt) * 17) % 7 == 0 {
                    failures.fetch_add(1, Ordering::Relaxed);
                    return Err(HandlerError::msg("transient"));
                }
                tally.mark(seq as usize);
                Ok(())
            })
        })
        .collect();
    drop(rx);
    std::thread::scope(|s| {
        for p in 0..PUBLISHERS {
            let bus = &bus;
            s.spawn(move || {
                let base = p * PER;
                for chunk in (0..PER).collect::<Vec<_>>().chunks(100) {
                    if chunk[0] % 200 == 0 {
                        bus.publish_batch(chunk.iter().map(|&i| Numbered {
                            publisher: p as u32,
                            seq: base + i,
                        }))
                        .unwrap();
                    } else {
                        for &i in chunk {
                            bus.publish(Numbered {
                                publisher: p as u32,
                                seq: base + i,
                            })
                            .unwrap();
                        }
                    }
                }
            });
        }
    });
    bus.flush(WAIT).unwrap();
    assert_eq!(tally.not_once(), vec![]);
    let failed = failures.load(Ordering::Relaxed);
    assert!(failed > 0);
    let stats = bus.stats();
    assert_eq!(stats.succeeded, n);
    assert_eq!((stats.failed, stats.retried), (failed, failed));
    assert_eq!(calls.load(Ordering::Relaxed), n + failed);
    let report = bus.shutdown().unwrap();
    assert!(report.is_balanced(), "{report:?}");
    assert!(!report.deadline_passed);
    drop(bus);
    let completed: u64 = completers.into_iter().map(|c| c.join().unwrap()).sum();
    assert_eq!(completed, n + failed);
}

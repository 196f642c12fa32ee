//! The typed ends of deliveries that did not succeed: a delivery made into a dead letter
//! ([`bury`]), the deliveries of an event that never ran (shutdown, shedding), and a dead
//! letter read back from a file made into a delivery again ([`decode_retry`]).

use super::*;

/// Makes a dead letter of a delivery of an event of type `E` that failed for good. The event's
/// `Serialize` runs under `runner`'s guard.
pub(super) fn bury<E: Event>(
    retry: Retry,
    reason: DeadLetterReason,
    id: u64,
    runner: &mut dyn Runner,
) -> DeadLetter {
    let Ok(sub) = retry.sub.clone().downcast::<Sub<E>>() else {
        unreachable!("a retry's functions match its subscription")
    };
    let Some(event) = retry.event.event.downcast_ref::<E>() else {
        unreachable!("a retry's functions match its event")
    };
    let payload = to_json(event, runner);
    sub.meta
        .outcomes
        .dead_lettered
        .fetch_add(1, Ordering::Relaxed);
    let attempts = u32::try_from(retry.history.errors.len()).unwrap_or(u32::MAX);
    let redrive: Option<crate::dead_letter::Redrive> = Some(Arc::new(Retry {
        ops: retry.ops,
        event: retry.event.clone(),
        sub: retry.sub,
        attempt: 1,
        history: History {
            errors: Vec::new(),
            first_failure: retry.history.first_failure,
        },
        tracked: false,
    }));
    DeadLetter {
        id,
        envelope: retry.event.envelope.clone(),
        event_name: E::NAME,
        event_version: E::VERSION,
        payload,
        subscription: sub.meta.id,
        handler: sub.meta.name.to_string(),
        service: sub.meta.service.as_str(),
        attempts,
        first_failure: retry.history.first_failure,
        // Set where the letter is made (`Burial::make`), from the bus's clock.
        last_failure: retry.history.first_failure,
        errors: retry.history.errors,
        reason,
        redrive,
        republish: None,
        blocked: None,
    }
}

/// The event as JSON, serialized under `runner`'s guard; when it fails or panics, the error
/// text as a JSON string instead.
pub(crate) fn to_json<E: Event>(event: &E, runner: &mut dyn Runner) -> String {
    let mut json = None;
    runner.run(Seam::Serde, &mut || {
        json = Some(serde_json::to_string(event))
    });
    let error = match json {
        Some(Ok(json)) => return json,
        Some(Err(e)) => format!("the event did not serialize: {e}"),
        None => "the event's Serialize panicked".to_owned(),
    };
    serde_json::to_string(&error).expect("a string serializes")
}

/// See [`Work::never_ran`]: the deliveries of a task or a batch of events of type `E`.
pub(super) fn never_ran<E: Event>(
    work: Work,
    lane: u8,
    snapshot: &Snapshot,
    done: &mut Vec<Done>,
) -> Vec<Retry> {
    let deliveries = work.deliveries();
    let subs_of = |generation: u32, source: NameId| -> Vec<&Arc<Sub<E>>> {
        snapshot.table::<Sub<E>>().map_or_else(Vec::new, |table| {
            table
                .subs
                .iter()
                .filter(|s| s.meta.matched(lane, generation, source))
                .collect()
        })
    };
    let first_attempt = |event: &Arc<SharedEvent>, sub: &Arc<Sub<E>>, now| Retry {
        ops: &OpsOf::<E>::OPS,
        event: event.clone(),
        sub: Arc::clone(sub) as Arc<dyn Any + Send + Sync>,
        attempt: 1,
        history: History {
            errors: Vec::new(),
            first_failure: now,
        },
        tracked: true,
    };
    let (events, generation, source): (Vec<(Envelope, E)>, u32, NameId) = match work {
        Work::Fanout(fanout) => {
            let subs = subs_of(fanout.generation, fanout.event.envelope.source_id());
            let gone = deliveries.saturating_sub(subs.len());
            if gone > 0
                && let Some(d) = fanout
                    .event
                    .envelope
                    .tracker()
                    .and_then(|t| t.settle(Settled::Left, gone))
            {
                done.push(d);
            }
            let now = SystemTime::now();
            return subs
                .iter()
                .map(|sub| first_attempt(&fanout.event, sub, now))
                .collect();
        }
        Work::Task(task) => {
            let (generation, source) = (task.generation, task.envelope.source_id());
            let Ok(event) = task.payload.downcast::<E>() else {
                unreachable!("a task's functions match its payload")
            };
            (
                vec![(task.envelope, event.into_inner())],
                generation,
                source,
            )
        }
        Work::Batch(batch) => {
            let (generation, source) = (batch.generation, batch.source);
            let Ok(items) = batch.items.downcast::<Vec<(Envelope, E)>>() else {
                unreachable!("a batch's functions match its payload")
            };
            (items.into_inner(), generation, source)
        }
        Work::Retry(_) => return Vec::new(),
    };
    let subs = subs_of(generation, source);
    let now = SystemTime::now();
    let mut retries = Vec::with_capacity(events.len() * subs.len());
    let gone = (deliveries / events.len().max(1)).saturating_sub(subs.len());
    for (envelope, event) in events {
        if gone > 0
            && let Some(d) = envelope
                .tracker()
                .and_then(|t| t.settle(Settled::Left, gone))
        {
            done.push(d);
        }
        let event = Arc::new(SharedEvent {
            envelope,
            event: Box::new(event),
        });
        for sub in &subs {
            retries.push(first_attempt(&event, sub, now));
        }
    }
    retries
}

/// Rebuilds a delivery of an event of type `E` read back from a dead-letter file: the event
/// decoded from `payload`, to the subscription now named `handler` in service `service`.
pub(crate) fn decode_retry<E: Event>(
    snapshot: &Snapshot,
    envelope: Envelope,
    payload: &str,
    handler: &str,
    service: &str,
) -> Result<Retry, String> {
    let event: E = serde_json::from_str(payload).map_err(|e| {
        format!(
            "the payload does not decode as {} v{}: {e}",
            E::NAME,
            E::VERSION
        )
    })?;
    retry_for(snapshot, envelope, event, handler, service)
}

/// A delivery of `event` to the subscription now named `handler` in service `service`, as a
/// first attempt (a dead letter read back from a file, made ready to redrive).
pub(crate) fn retry_for<E: Event>(
    snapshot: &Snapshot,
    envelope: Envelope,
    event: E,
    handler: &str,
    service: &str,
) -> Result<Retry, String> {
    let sub = snapshot
        .table::<Sub<E>>()
        .and_then(|t| {
            t.subs.iter().find(|s| {
                &*s.meta.name == handler
                    && s.meta.service.as_str() == service
                    && s.meta.active.load(Ordering::SeqCst)
            })
        })
        .cloned()
        .ok_or_else(|| {
            format!(
                "no subscription of {service} named {handler:?} handles {}",
                E::NAME
            )
        })?;
    Ok(Retry {
        ops: &OpsOf::<E>::OPS,
        event: Arc::new(SharedEvent {
            envelope,
            event: Box::new(event),
        }),
        sub,
        attempt: 1,
        history: History {
            errors: Vec::new(),
            first_failure: SystemTime::now(),
        },
        tracked: false,
    })
}

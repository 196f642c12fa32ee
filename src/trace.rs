//! Correlation traces: the last deliveries the bus ran, kept to show one conversation as a
//! causal tree.
//!
//! Ground rules: off unless [`BusBuilder::trace_capacity`](crate::BusBuilder::trace_capacity)
//! is set; then each delivery that ran adds one entry to a bounded ring behind a mutex (the
//! oldest falls out), and the worker times the handler with the monotonic clock. With the ring
//! off, a delivery pays one branch.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;

use crate::event::EventId;

/// What became of one handler run.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TraceOutcome {
    /// The handler returned `Ok`.
    Succeeded,
    /// The handler returned an error or panicked; the text of the error.
    Failed(String),
    /// The handler returned `Ok` after [`Context::defer`](crate::Context::defer): the outcome
    /// comes later, from the [`Deferred`](crate::Deferred).
    Deferred,
}

/// One handler run of a traced conversation.
#[derive(Debug, Clone)]
pub struct TraceEntry {
    /// The event's id.
    pub event_id: EventId,
    /// The event's [`Event::NAME`](crate::Event::NAME).
    pub event: &'static str,
    /// The service that published it.
    pub source: &'static str,
    /// Its correlation id.
    pub correlation_id: EventId,
    /// The event that caused it, if any.
    pub causation_id: Option<EventId>,
    /// The service that handled it.
    pub service: &'static str,
    /// The handler's name.
    pub handler: String,
    /// Which attempt this was.
    pub attempt: u32,
    /// What came of it.
    pub outcome: TraceOutcome,
    /// When the handler started.
    pub started_at: SystemTime,
    /// How long it ran.
    pub took: Duration,
}

/// The deliveries of one conversation (one correlation id) that the trace ring still holds,
/// oldest first. Its `Display` prints them as a causal tree: each event under the event whose
/// handler published it.
#[derive(Debug, Clone)]
pub struct Trace {
    /// The conversation's correlation id.
    pub correlation_id: EventId,
    /// Its deliveries, oldest first.
    pub entries: Vec<TraceEntry>,
}

impl Trace {
    /// The distinct events, in the order their first delivery started.
    pub fn events(&self) -> Vec<EventId> {
        let mut ids: Vec<EventId> = Vec::new();
        for entry in &self.entries {
            if !ids.contains(&entry.event_id) {
                ids.push(entry.event_id);
            }
        }
        ids
    }

    /// The conversation as lines, one per handler run, in the order of its tree (see the
    /// `Display`): each event's runs in the order they started, then the events their
    /// handlers published, indented two spaces per level. A line names the event, its
    /// source, the handler that ran (`service/handler`), the attempt and the outcome — no ids
    /// or times, so that a test can assert a flow's shape:
    ///
    /// ```text
    /// OrderPlaced from orders: payments/charge #1 failed: gateway down
    /// OrderPlaced from orders: payments/charge #2 ok
    ///   PaymentCaptured from payments: shipping/ship #1 ok
    /// ```
    ///
    /// With one worker per lane the lines repeat from run to run; with more, runs of one
    /// event by different handlers (and sibling events) may start in another order.
    ///
    /// # Examples
    ///
    /// ```
    /// use microbus::{Bus, Context, Event, HandlerResult, SubscribeOptions};
    /// use serde::{Deserialize, Serialize};
    /// use std::time::Duration;
    ///
    /// #[derive(Serialize, Deserialize)]
    /// struct OrderPlaced { order: u64 }
    /// impl Event for OrderPlaced { const NAME: &'static str = "OrderPlaced"; }
    /// #[derive(Serialize, Deserialize)]
    /// struct PaymentCaptured { order: u64 }
    /// impl Event for PaymentCaptured { const NAME: &'static str = "PaymentCaptured"; }
    ///
    /// let bus = Bus::builder().workers(1).trace_capacity(100).build()?;
    /// bus.service("payments")?.subscribe_with(
    ///     SubscribeOptions::new().named("charge"),
    ///     |o: &OrderPlaced, ctx: &Context| -> HandlerResult {
    ///         ctx.publish(PaymentCaptured { order: o.order })?;
    ///         Ok(())
    ///     },
    /// )?;
    /// bus.service("shipping")?.subscribe_with(
    ///     SubscribeOptions::new().named("ship"),
    ///     |_: &PaymentCaptured, _: &Context| -> HandlerResult { Ok(()) },
    /// )?;
    /// let id = bus.service("orders")?.publish(OrderPlaced { order: 1 })?;
    /// bus.flush(Duration::from_secs(5))?;
    /// assert_eq!(
    ///     bus.trace(id).path(),
    ///     [
    ///         "OrderPlaced from orders: payments/charge #1: ok",
    ///         "  PaymentCaptured from payments: shipping/ship #1: ok",
    ///     ]
    /// );
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn path(&self) -> Vec<String> {
        let mut lines = Vec::new();
        let _ = self.walk(&mut |depth, runs| {
            for run in runs {
                lines.push(format!(
                    "{}{} from {}: {}/{} #{}: {}",
                    "  ".repeat(depth),
                    run.event,
                    run.source,
                    run.service,
                    run.handler,
                    run.attempt,
                    outcome(&run.outcome)
                ));
            }
            Ok(())
        });
        lines
    }

    /// Visits each event of the tree, depth first, with its depth and its runs (roots: no
    /// cause, or a cause the ring no longer holds).
    fn walk(&self, visit: &mut dyn FnMut(usize, &[&TraceEntry]) -> fmt::Result) -> fmt::Result {
        let events = self.events();
        let cause_of = |event: EventId| {
            self.entries
                .iter()
                .find(|e| e.event_id == event)
                .and_then(|e| e.causation_id)
        };
        for &event in &events {
            if cause_of(event).is_none_or(|cause| !events.contains(&cause)) {
                self.visit(event, 0, &events, &cause_of, visit)?;
            }
        }
        Ok(())
    }

    fn visit(
        &self,
        event: EventId,
        depth: usize,
        events: &[EventId],
        cause_of: &dyn Fn(EventId) -> Option<EventId>,
        visit: &mut dyn FnMut(usize, &[&TraceEntry]) -> fmt::Result,
    ) -> fmt::Result {
        let runs: Vec<&TraceEntry> = self
            .entries
            .iter()
            .filter(|e| e.event_id == event)
            .collect();
        if runs.is_empty() {
            return Ok(());
        }
        visit(depth, &runs)?;
        for &child in events {
            if cause_of(child) == Some(event) {
                self.visit(child, depth + 1, events, cause_of, visit)?;
            }
        }
        Ok(())
    }
}

fn outcome(outcome: &TraceOutcome) -> String {
    match outcome {
        TraceOutcome::Succeeded => "ok".to_owned(),
        TraceOutcome::Failed(error) => format!("failed: {error}"),
        TraceOutcome::Deferred => "deferred".to_owned(),
    }
}

impl fmt::Display for Trace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.walk(&mut |depth, runs| {
            let first = runs[0];
            let indent = "    ".repeat(depth);
            writeln!(
                f,
                "{indent}{} {} from {}",
                first.event, first.event_id, first.source
            )?;
            for run in runs {
                writeln!(
                    f,
                    "{indent}  - {} / {} (attempt {}, {:?}): {}",
                    run.service,
                    run.handler,
                    run.attempt,
                    run.took,
                    outcome(&run.outcome)
                )?;
            }
            Ok(())
        })
    }
}

/// The bounded ring of recent deliveries.
pub(crate) struct TraceRing {
    capacity: usize,
    entries: Mutex<VecDeque<TraceEntry>>,
}

impl TraceRing {
    pub(crate) fn new(capacity: usize) -> TraceRing {
        TraceRing {
            capacity,
            entries: Mutex::new(VecDeque::with_capacity(capacity.min(1 << 16))),
        }
    }

    #[inline]
    pub(crate) fn on(&self) -> bool {
        self.capacity > 0
    }

    pub(crate) fn record(&self, entry: TraceEntry) {
        let mut entries = self.entries.lock();
        if entries.len() >= self.capacity {
            entries.pop_front();
        }
        entries.push_back(entry);
    }

    pub(crate) fn trace(&self, correlation_id: EventId) -> Trace {
        let entries = self
            .entries
            .lock()
            .iter()
            .filter(|e| e.correlation_id == correlation_id)
            .cloned()
            .collect();
        Trace {
            correlation_id,
            entries,
        }
    }
}

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

    fn print(&self, f: &mut fmt::Formatter<'_>, event: EventId, depth: usize) -> fmt::Result {
        let runs: Vec<&TraceEntry> = self
            .entries
            .iter()
            .filter(|e| e.event_id == event)
            .collect();
        let Some(first) = runs.first() else {
            return Ok(());
        };
        let indent = "    ".repeat(depth);
        writeln!(
            f,
            "{indent}{} {} from {}",
            first.event, first.event_id, first.source
        )?;
        for run in &runs {
            let outcome = match &run.outcome {
                TraceOutcome::Succeeded => "ok".to_owned(),
                TraceOutcome::Failed(error) => format!("failed: {error}"),
                TraceOutcome::Deferred => "deferred".to_owned(),
            };
            writeln!(
                f,
                "{indent}  - {} / {} (attempt {}, {:?}): {outcome}",
                run.service, run.handler, run.attempt, run.took
            )?;
        }
        for child in self.events() {
            let caused_by = self
                .entries
                .iter()
                .find(|e| e.event_id == child)
                .and_then(|e| e.causation_id);
            if caused_by == Some(event) {
                self.print(f, child, depth + 1)?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for Trace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let events = self.events();
        for &event in &events {
            let caused_by = self
                .entries
                .iter()
                .find(|e| e.event_id == event)
                .and_then(|e| e.causation_id);
            // Roots: no causation, or a cause the ring no longer holds.
            if caused_by.is_none_or(|cause| !events.contains(&cause)) {
                self.print(f, event, 0)?;
            }
        }
        Ok(())
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

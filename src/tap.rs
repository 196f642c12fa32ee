//! Audit taps: callbacks that see every published event, of every type, without being a
//! subscription.
//!
//! Ground rules: the list of taps sits in an `ArcSwap` (a tap runs with no lock held, and may
//! block or add a tap), with a flag beside it so that
//! a bus without taps pays one relaxed load per event. An accepted event is tapped once, on the
//! worker that takes it, before its handlers run; an event that matches no subscription never
//! reaches a worker and is tapped where it is published. A tap runs on that thread: a slow tap
//! slows that shard. A tap that panics is counted and the bus goes on.

use std::fmt;
use std::io::Write;
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use serde::Serialize;

use crate::event::Envelope;
use crate::guard::{Runner, Seam};
use crate::sync::{AtomicBool, AtomicU64, Ordering};

/// One published event, as a tap sees it.
pub struct Tapped<'a> {
    pub(crate) event: &'static str,
    pub(crate) version: u32,
    pub(crate) envelope: &'a Envelope,
    pub(crate) payload: &'a dyn Fn() -> String,
}

impl Tapped<'_> {
    /// The event's [`Event::NAME`](crate::Event::NAME).
    pub fn event_name(&self) -> &'static str {
        self.event
    }

    /// The event's [`Event::VERSION`](crate::Event::VERSION).
    pub fn event_version(&self) -> u32 {
        self.version
    }

    /// The event's envelope.
    pub fn envelope(&self) -> &Envelope {
        self.envelope
    }

    /// The event serialized as JSON, made when asked for.
    pub fn payload_json(&self) -> String {
        (self.payload)()
    }

    /// One line of JSON: the event's name, version, envelope and payload.
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct Line<'a> {
            event: &'a str,
            version: u32,
            envelope: &'a Envelope,
            payload: &'a serde_json::value::RawValue,
        }
        let payload = self.payload_json();
        let payload: &serde_json::value::RawValue =
            serde_json::from_str(&payload).expect("payloads are JSON made by serde_json");
        serde_json::to_string(&Line {
            event: self.event,
            version: self.version,
            envelope: self.envelope,
            payload,
        })
        .expect("a tapped event serializes")
    }
}

impl fmt::Debug for Tapped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tapped")
            .field("event", &self.event)
            .field("envelope", self.envelope)
            .finish_non_exhaustive()
    }
}

pub(crate) type TapFn = Arc<dyn Fn(&Tapped<'_>) + Send + Sync>;

/// The bus's taps.
#[derive(Default)]
pub(crate) struct Taps {
    on: AtomicBool,
    list: ArcSwap<Vec<TapFn>>,
    failures: Arc<AtomicU64>,
}

impl Taps {
    pub(crate) fn add(&self, tap: TapFn) {
        self.list.rcu(|list| {
            let mut list = Vec::clone(list);
            list.push(tap.clone());
            list
        });
        self.on.store(true, Ordering::Release);
    }

    /// Whether any tap is set.
    #[inline]
    pub(crate) fn on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Shows `tapped` to every tap, each under `runner`'s guard. A tap that panics is counted
    /// as a failure; the bus goes on.
    #[cold]
    pub(crate) fn call(&self, tapped: &Tapped<'_>, runner: &mut dyn Runner) {
        let taps = self.list.load_full();
        for tap in taps.iter() {
            if !runner.run(Seam::Tap, &mut || tap(tapped)) {
                self.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Drops every tap (the bus has stopped): user handles become their last owners.
    pub(crate) fn forget(&self) -> Vec<TapFn> {
        self.on.store(false, Ordering::Release);
        Vec::clone(&self.list.swap(Arc::default()))
    }

    /// Adds a tap that appends every event to the file at `path` as a JSON line.
    pub(crate) fn add_file(&self, path: &std::path::Path) -> std::io::Result<()> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let file = Mutex::new(std::io::LineWriter::new(file));
        let failures = self.failures.clone();
        self.add(Arc::new(move |tapped: &Tapped<'_>| {
            if writeln!(file.lock(), "{}", tapped.to_json()).is_err() {
                failures.fetch_add(1, Ordering::Relaxed);
            }
        }));
        Ok(())
    }

    pub(crate) fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

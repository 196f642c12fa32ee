//! The dead-letter ring: deliveries that failed for good, kept for people to inspect, export,
//! redrive and purge.
//!
//! Ground rules: one bounded ring behind a mutex, taken only on the failure path and by the
//! API. When it is full the oldest entry is evicted: counted, and handed to the sink if one is
//! set. Each entry keeps what it takes to run the delivery again — the event, shared with any
//! other failed deliveries of it, and the subscription — so a redrive goes back to the same
//! subscription with its attempts reset.

use std::any::Any;
use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::event::Envelope;
use crate::guard::{Runner, Seam, drop_with};
use crate::sync::{AtomicU64, Ordering};

/// Why a delivery was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DeadLetterReason {
    /// Every attempt its retry policy allows failed.
    RetriesExhausted,
    /// The handler returned an error made with
    /// [`HandlerError::permanent`](crate::HandlerError::permanent).
    Permanent,
    /// A retry was still waiting when the bus shut down.
    Shutdown,
    /// A message from outside the process (a bridge) that did not decode into its event type:
    /// kept with its raw text, never retried.
    Undecodable,
    /// Its lane, with [`Backpressure::Shed`](crate::Backpressure::Shed), had no room for it
    /// when it was published: it never ran.
    Shed,
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::RetriesExhausted => "retries exhausted",
            Self::Permanent => "permanent error",
            Self::Shutdown => "shutdown",
            Self::Undecodable => "undecodable",
            Self::Shed => "shed",
        })
    }
}

/// A delivery that failed for good.
pub struct DeadLetter {
    pub(crate) id: u64,
    pub(crate) envelope: Envelope,
    pub(crate) event_name: &'static str,
    pub(crate) event_version: u32,
    pub(crate) payload: String,
    pub(crate) subscription: u64,
    pub(crate) handler: String,
    pub(crate) service: &'static str,
    pub(crate) errors: Vec<String>,
    pub(crate) attempts: u32,
    pub(crate) first_failure: SystemTime,
    pub(crate) last_failure: SystemTime,
    pub(crate) reason: DeadLetterReason,
    /// What it takes to run the delivery again; `None` for an entry loaded from a file that
    /// cannot be redriven, and `blocked` says why.
    pub(crate) redrive: Option<Redrive>,
    /// For a message that came from outside and was never published (a bridge's entry
    /// delivered too often): publishes it again, with its envelope, to the subscriptions its
    /// type has then.
    pub(crate) republish: Option<Republish>,
    pub(crate) blocked: Option<String>,
}

/// Publishes a dead letter that was never published (see [`DeadLetter::republish`]) into the
/// bus, decoding its payload as its type; `Err` says why it could not.
/// The engine is passed as `&dyn Any` (the bus's core): this module knows no engine.
pub(crate) type Republish = fn(&dyn Any, &DeadLetter) -> Result<(), RedriveError>;

/// The way back to a letter's subscription (the bus's erased retry of its delivery): the ring
/// only clones it, and lets go of it when the bus stops.
pub(crate) type Redrive = Arc<dyn Any + Send + Sync>;

impl DeadLetter {
    /// Its number in this bus's dead-letter ring, for [`DeadLetters::redrive`](crate::DeadLetters::redrive).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The failed event's envelope, unchanged.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// The event's [`Event::NAME`](crate::Event::NAME).
    pub fn event_name(&self) -> &'static str {
        self.event_name
    }

    /// The event's [`Event::VERSION`](crate::Event::VERSION).
    pub fn event_version(&self) -> u32 {
        self.event_version
    }

    /// The event, serialized as JSON.
    pub fn payload_json(&self) -> &str {
        &self.payload
    }

    /// The id of the subscription whose deliveries failed.
    pub fn subscription(&self) -> u64 {
        self.subscription
    }

    /// The handler's name.
    pub fn handler(&self) -> &str {
        &self.handler
    }

    /// The service that subscribed.
    pub fn service(&self) -> &'static str {
        self.service
    }

    /// The text of every failed attempt's error, in order (a panic's message for a panic).
    pub fn errors(&self) -> &[String] {
        &self.errors
    }

    /// How many attempts were made.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// When the first attempt failed.
    pub fn first_failure(&self) -> SystemTime {
        self.first_failure
    }

    /// When the last attempt failed.
    pub fn last_failure(&self) -> SystemTime {
        self.last_failure
    }

    /// Why it was dead-lettered.
    pub fn reason(&self) -> DeadLetterReason {
        self.reason
    }

    /// Why it cannot be redriven, or `None` when it can: for an entry loaded from a file, its
    /// payload no longer decodes, or its event type or its subscription is not there; for an
    /// entry a bridge's import could not decode, why. (An entry an import dead-lettered because
    /// it was delivered too often decodes: a redrive publishes it into the bus, with its
    /// envelope, to the subscriptions of its type.)
    pub fn not_redrivable(&self) -> Option<&str> {
        self.blocked.as_deref()
    }

    /// One line of JSON: the envelope, the event, and the failures.
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct Line<'a> {
            id: u64,
            event: &'a str,
            version: u32,
            envelope: &'a Envelope,
            payload: &'a serde_json::value::RawValue,
            subscription: u64,
            handler: &'a str,
            service: &'a str,
            attempts: u32,
            errors: &'a [String],
            first_failure_unix_nanos: u128,
            last_failure_unix_nanos: u128,
            reason: DeadLetterReason,
        }
        let nanos = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        };
        let payload: &serde_json::value::RawValue =
            serde_json::from_str(&self.payload).expect("payloads are JSON made by serde_json");
        let line = Line {
            id: self.id,
            event: self.event_name,
            version: self.event_version,
            envelope: &self.envelope,
            payload,
            subscription: self.subscription,
            handler: &self.handler,
            service: self.service,
            attempts: self.attempts,
            errors: &self.errors,
            first_failure_unix_nanos: nanos(self.first_failure),
            last_failure_unix_nanos: nanos(self.last_failure),
            reason: self.reason,
        };
        serde_json::to_string(&line).expect("a dead letter serializes")
    }
}

impl fmt::Debug for DeadLetter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetter")
            .field("id", &self.id)
            .field("event", &self.event_name)
            .field("event_id", &self.envelope.id())
            .field("handler", &self.handler)
            .field("attempts", &self.attempts)
            .field("reason", &self.reason)
            .field("last_error", &self.errors.last())
            .finish_non_exhaustive()
    }
}

/// Which dead letters to list or redrive. Every criterion set must match.
///
/// # Examples
///
/// ```
/// use microbus::{DeadLetterFilter, DeadLetterReason};
///
/// let filter = DeadLetterFilter::new()
///     .event("OrderCreated")
///     .reason(DeadLetterReason::RetriesExhausted);
/// # let _ = filter;
/// ```
#[derive(Debug, Clone, Default)]
pub struct DeadLetterFilter {
    event: Option<String>,
    source: Option<String>,
    handler: Option<String>,
    reason: Option<DeadLetterReason>,
}

impl DeadLetterFilter {
    /// Matches every dead letter.
    pub fn new() -> DeadLetterFilter {
        DeadLetterFilter::default()
    }

    /// Only events of this [`Event::NAME`](crate::Event::NAME).
    pub fn event(mut self, name: impl Into<String>) -> DeadLetterFilter {
        self.event = Some(name.into());
        self
    }

    /// Only events published by this service.
    pub fn source(mut self, service: impl Into<String>) -> DeadLetterFilter {
        self.source = Some(service.into());
        self
    }

    /// Only deliveries to the handler of this name.
    pub fn handler(mut self, name: impl Into<String>) -> DeadLetterFilter {
        self.handler = Some(name.into());
        self
    }

    /// Only dead letters with this reason.
    pub fn reason(mut self, reason: DeadLetterReason) -> DeadLetterFilter {
        self.reason = Some(reason);
        self
    }

    /// Whether `letter` matches.
    pub fn matches(&self, letter: &DeadLetter) -> bool {
        self.event.as_deref().is_none_or(|e| e == letter.event_name)
            && self
                .source
                .as_deref()
                .is_none_or(|s| s == letter.envelope.source())
            && self.handler.as_deref().is_none_or(|h| h == letter.handler)
            && self.reason.is_none_or(|r| r == letter.reason)
    }
}

/// What a [`DeadLetters`](crate::DeadLetters) sink receives: every dead letter evicted from a full ring.
pub type DeadLetterSink = Arc<dyn Fn(&DeadLetter) + Send + Sync>;

/// The ring and its counters.
pub(crate) struct Ring {
    capacity: usize,
    entries: Mutex<VecDeque<DeadLetter>>,
    next_id: AtomicU64,
    evicted: AtomicU64,
    /// The sink and the hook: user code, run by whoever pushed, under the guard, once the
    /// delivery is settled. Dropped when the bus stops ([`Ring::forget_callbacks`]).
    sink: Mutex<Option<DeadLetterSink>>,
    on_dead_letter: Mutex<Option<DeadLetterSink>>,
    pub(crate) sink_failures: Arc<AtomicU64>,
}

/// What a push leaves to do once the delivery is settled: the hook's view of the new dead
/// letter, and the letters evicted for the sink. Run it with [`Ring::call_back`].
#[must_use = "the hook and the sink must be called"]
pub(crate) struct Aftermath {
    hooked: Option<DeadLetter>,
    evicted: Vec<DeadLetter>,
}

impl Aftermath {
    /// The letters the push evicted.
    pub(crate) fn evicted(&self) -> &[DeadLetter] {
        &self.evicted
    }
}

impl Ring {
    pub(crate) fn new(
        capacity: usize,
        sink: Option<DeadLetterSink>,
        on_dead_letter: Option<DeadLetterSink>,
        sink_failures: Arc<AtomicU64>,
    ) -> Ring {
        Ring {
            capacity,
            entries: Mutex::new(VecDeque::new()),
            next_id: AtomicU64::new(1),
            evicted: AtomicU64::new(0),
            sink: Mutex::new(sink),
            on_dead_letter: Mutex::new(on_dead_letter),
            sink_failures,
        }
    }

    /// Whether dead letters are kept at all.
    pub(crate) fn enabled(&self) -> bool {
        self.capacity > 0
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Keeps `letter`, evicting the oldest entry when the ring is full. The hook and the sink
    /// are left to the caller ([`call_back`](Self::call_back)).
    pub(crate) fn push(&self, letter: DeadLetter) -> Aftermath {
        let hooked = self.on_dead_letter.lock().is_some().then(|| letter.clone());
        let evicted = {
            let mut entries = self.entries.lock();
            let evicted = if entries.len() >= self.capacity {
                entries.pop_front()
            } else {
                None
            };
            entries.push_back(letter);
            evicted
        };
        if evicted.is_some() {
            self.evicted.fetch_add(1, Ordering::Relaxed);
        }
        Aftermath {
            hooked,
            evicted: evicted.into_iter().collect(),
        }
    }

    /// Runs what a push left to do, each call under `runner`'s guard: the hook, then the sink
    /// for each evicted letter; then drops the evicted letters (their events' `Drop`).
    pub(crate) fn call_back(&self, after: Aftermath, runner: &mut dyn Runner) {
        let Aftermath { hooked, evicted } = after;
        if let Some(letter) = hooked {
            let hook = self.on_dead_letter.lock().clone();
            if let Some(hook) = hook {
                runner.run(Seam::Hook, &mut || hook(&letter));
            }
            drop_with(runner, letter);
        }
        if evicted.is_empty() {
            return;
        }
        let sink = self.sink.lock().clone();
        for old in evicted {
            if let Some(sink) = &sink {
                runner.run(Seam::Sink, &mut || sink(&old));
            }
            drop_with(runner, old);
        }
    }

    /// Drops the sink and the hook (the bus has stopped): user handles become their last
    /// owners.
    pub(crate) fn forget_callbacks(&self) -> [Option<DeadLetterSink>; 2] {
        [self.sink.lock().take(), self.on_dead_letter.lock().take()]
    }

    pub(crate) fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.lock().len()
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Calls `f` on each entry matching `filter`, oldest first, under the lock.
    pub(crate) fn each(&self, filter: &DeadLetterFilter, mut f: impl FnMut(&DeadLetter)) {
        for letter in self.entries.lock().iter().filter(|l| filter.matches(l)) {
            f(letter);
        }
    }

    /// Takes out the entries matching `filter`.
    pub(crate) fn take(&self, filter: &DeadLetterFilter) -> Vec<DeadLetter> {
        let mut entries = self.entries.lock();
        let (taken, kept): (Vec<_>, Vec<_>) = entries.drain(..).partition(|l| filter.matches(l));
        entries.extend(kept);
        taken
    }

    /// Takes out entry `id`.
    pub(crate) fn take_id(&self, id: u64) -> Option<DeadLetter> {
        let mut entries = self.entries.lock();
        let index = entries.iter().position(|l| l.id == id)?;
        entries.remove(index)
    }

    /// Puts entries back (a redrive that could not go through) in id order. If dead letters
    /// arrived meanwhile and the ring overflows, the oldest are evicted, as by
    /// [`push`](Self::push) (no hook: they are not new).
    pub(crate) fn put_back(&self, letters: Vec<DeadLetter>) -> Aftermath {
        let evicted: Vec<DeadLetter> = {
            let mut entries = self.entries.lock();
            for letter in letters.into_iter().rev() {
                entries.push_front(letter);
            }
            entries.make_contiguous().sort_by_key(|l| l.id);
            let over = entries.len().saturating_sub(self.capacity);
            entries.drain(..over).collect()
        };
        self.evicted
            .fetch_add(evicted.len() as u64, Ordering::Relaxed);
        Aftermath {
            hooked: None,
            evicted,
        }
    }

    /// Strips the way back to their subscriptions from the letters held (the bus has stopped:
    /// none can be redriven, and the subscriptions' handlers are let go). Returns what it
    /// took, for the caller to drop.
    pub(crate) fn strip_redrives(&self) -> Vec<Redrive> {
        let mut entries = self.entries.lock();
        entries
            .iter_mut()
            .filter_map(|l| l.redrive.take())
            .collect()
    }
}

/// One line of a dead-letter file, as [`DeadLetter::to_json`] writes it.
#[derive(Deserialize)]
pub(crate) struct Line {
    pub(crate) event: String,
    pub(crate) version: u32,
    pub(crate) envelope: Envelope,
    pub(crate) payload: Box<serde_json::value::RawValue>,
    pub(crate) handler: String,
    pub(crate) service: String,
    pub(crate) attempts: u32,
    pub(crate) errors: Vec<String>,
    pub(crate) first_failure_unix_nanos: u64,
    pub(crate) last_failure_unix_nanos: u64,
    pub(crate) reason: DeadLetterReason,
}

/// Why a redrive did not go through. The dead letter stays in (or goes back to) the ring,
/// except when there was none with that id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RedriveError {
    /// No dead letter has that id (any more).
    NotFound(u64),
    /// Its subscription has ended: there is nothing to deliver it to.
    SubscriptionGone(u64),
    /// It was loaded from a file and cannot be redriven (see
    /// [`DeadLetter::not_redrivable`]).
    NotRedrivable(u64),
    /// The bus is shut down.
    Shutdown(u64),
}

impl fmt::Display for RedriveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotFound(id) => write!(f, "no dead letter {id}"),
            Self::SubscriptionGone(id) => {
                write!(f, "dead letter {id}: its subscription has ended")
            }
            Self::Shutdown(id) => write!(f, "dead letter {id}: the bus is shut down"),
            Self::NotRedrivable(id) => write!(f, "dead letter {id} cannot be redriven"),
        }
    }
}

impl std::error::Error for RedriveError {}

impl Clone for DeadLetter {
    fn clone(&self) -> Self {
        DeadLetter {
            id: self.id,
            envelope: self.envelope.clone(),
            event_name: self.event_name,
            event_version: self.event_version,
            payload: self.payload.clone(),
            subscription: self.subscription,
            handler: self.handler.clone(),
            service: self.service,
            errors: self.errors.clone(),
            attempts: self.attempts,
            first_failure: self.first_failure,
            last_failure: self.last_failure,
            reason: self.reason,
            redrive: self.redrive.clone(),
            republish: self.republish,
            blocked: self.blocked.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::NameId;
    use proptest::prelude::*;

    const REASONS: [DeadLetterReason; 4] = [
        DeadLetterReason::RetriesExhausted,
        DeadLetterReason::Permanent,
        DeadLetterReason::Shutdown,
        DeadLetterReason::Shed,
    ];

    fn letter(id: u64, reason: DeadLetterReason) -> DeadLetter {
        let now = SystemTime::now();
        DeadLetter {
            id,
            envelope: Envelope::stamp(NameId::intern("tests"), Default::default()),
            event_name: "Tested",
            event_version: 1,
            payload: "{}".to_owned(),
            subscription: 1,
            handler: "handler".to_owned(),
            service: "tests",
            errors: vec!["failed".to_owned()],
            attempts: 1,
            first_failure: now,
            last_failure: now,
            reason,
            redrive: None,
            republish: None,
            blocked: None,
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(usize),
        /// Take the entry at this position of the ring (modulo its length), as a redrive does.
        TakeAt(usize),
        /// Take every entry of a reason, as a filtered redrive or purge does.
        TakeReason(usize),
        /// Put the last taken entries back, as a redrive that could not go does.
        PutBack,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..REASONS.len()).prop_map(Op::Push),
            1 => any::<usize>().prop_map(Op::TakeAt),
            1 => (0..REASONS.len()).prop_map(Op::TakeReason),
            1 => Just(Op::PutBack),
        ]
    }

    fn ids(ring: &Ring) -> Vec<u64> {
        let mut ids = Vec::new();
        ring.each(&DeadLetterFilter::new(), |l| ids.push(l.id));
        ids
    }

    proptest! {
        /// Against a `VecDeque` model: the ring holds at most `capacity` entries, the newest,
        /// in order; `evicted + len == pushed + put back − taken`; and the sink gets exactly
        /// the evicted entries, oldest first.
        #[test]
        fn the_ring_matches_a_bounded_queue(capacity in 1usize..8, ops in prop::collection::vec(op(), 1..150)) {
            let sunk = Arc::new(Mutex::new(Vec::new()));
            let sink: DeadLetterSink = {
                let sunk = sunk.clone();
                Arc::new(move |l: &DeadLetter| sunk.lock().push(l.id))
            };
            let ring = Ring::new(capacity, Some(sink), None, Arc::default());
            let panics = crate::guard::Panics::default();
            let mut model: VecDeque<(u64, usize)> = VecDeque::new();
            let mut model_evicted = Vec::new();
            let (mut pushed, mut taken, mut put_back) = (0u64, 0u64, 0u64);
            let mut last_taken: Vec<DeadLetter> = Vec::new();
            for op in ops {
                match op {
                    Op::Push(reason) => {
                        let id = ring.next_id();
                        let after = ring.push(letter(id, REASONS[reason]));
                        ring.call_back(after, &mut &panics);
                        pushed += 1;
                        if model.len() == capacity {
                            model_evicted.push(model.pop_front().unwrap().0);
                        }
                        model.push_back((id, reason));
                    }
                    Op::TakeAt(at) => {
                        if model.is_empty() {
                            continue;
                        }
                        let (id, _) = model.remove(at % model.len()).unwrap();
                        let letter = ring.take_id(id);
                        prop_assert_eq!(letter.as_ref().map(|l| l.id), Some(id));
                        taken += 1;
                        last_taken = letter.into_iter().collect();
                    }
                    Op::TakeReason(reason) => {
                        let filter = DeadLetterFilter::new().reason(REASONS[reason]);
                        last_taken = ring.take(&filter);
                        let expected: Vec<u64> =
                            model.iter().filter(|(_, r)| *r == reason).map(|(id, _)| *id).collect();
                        let got: Vec<u64> = last_taken.iter().map(|l| l.id).collect();
                        prop_assert_eq!(got, expected);
                        model.retain(|(_, r)| *r != reason);
                        taken += last_taken.len() as u64;
                    }
                    Op::PutBack => {
                        let back = std::mem::take(&mut last_taken);
                        put_back += back.len() as u64;
                        for l in &back {
                            let reason = REASONS.iter().position(|r| *r == l.reason).unwrap();
                            model.push_back((l.id, reason));
                        }
                        model.make_contiguous().sort_unstable();
                        while model.len() > capacity {
                            model_evicted.push(model.pop_front().unwrap().0);
                        }
                        let after = ring.put_back(back);
                        ring.call_back(after, &mut &panics);
                    }
                }
                let expected: Vec<u64> = model.iter().map(|(id, _)| *id).collect();
                prop_assert_eq!(ids(&ring), expected);
                prop_assert!(ring.len() <= capacity);
                prop_assert_eq!(ring.evicted(), model_evicted.len() as u64);
                prop_assert_eq!(ring.evicted() + ring.len() as u64, pushed + put_back - taken);
                prop_assert_eq!(&*sunk.lock(), &model_evicted);
            }
        }
    }
}

//! What a bus reports of its deliveries: [`BusStats`], and what shutdown did
//! ([`ShutdownReport`]).
//!
//! Ground rules: the ledger's terms are listed once, in [`BusStats::terms`]; the shutdown
//! report, the metrics table and Prometheus all print from that list.

use std::fmt;
use std::time::Duration;

use crate::guard::CallbackPanics;
use crate::id::EventId;
use crate::sync::{AtomicU64, Ordering};

/// How long past its deadline [`Bus::shutdown`](crate::Bus::shutdown) may take at most, whatever user code is running:
/// to detach workers stuck in handlers or callbacks, to sweep what never ran, and to wait for
/// the thread that runs what user code it left over (see [`ShutdownReport::cut_off`]).
pub const SHUTDOWN_GRACE: Duration = Duration::from_millis(100);

/// Counts of what the bus did with its deliveries (one event × one subscription it matched).
///
/// The terms add up: `delivered = succeeded + dead_lettered + discarded + dropped +
/// cancelled + abandoned + left + in_flight`, which [`is_balanced`](Self::is_balanced)
/// checks.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct BusStats {
    /// Deliveries accepted: each published event times the subscriptions it matched.
    pub delivered: u64,
    /// Deliveries whose handler returned `Ok`.
    pub succeeded: u64,
    /// Failed attempts: handler errors and panics.
    pub failed: u64,
    /// Of the failed attempts, how many were panics.
    pub panicked: u64,
    /// Failed deliveries that will not be tried again, dropped because dead letters are off.
    pub discarded: u64,
    /// Failed deliveries whose failure said to drop the event
    /// ([`HandlerError::discard`](crate::HandlerError::discard), or a
    /// [`retry_if`](crate::SubscribeOptions::retry_if) classifier's
    /// [`Verdict::Discard`](crate::Verdict::Discard)): never retried, never dead-lettered.
    #[serde(default)]
    pub dropped: u64,
    /// Retries scheduled: failed attempts that are tried again.
    pub retried: u64,
    /// Failed deliveries kept in the dead-letter ring (those evicted since included).
    pub dead_lettered: u64,
    /// Dead letters evicted from the full ring (and handed to the sink, if one is set).
    pub evicted: u64,
    /// Deliveries whose subscription ended before they ran.
    pub cancelled: u64,
    /// Deliveries still running when the shutdown deadline passed, or deferred
    /// ([`Context::defer`](crate::Context::defer)) and not completed by then.
    pub abandoned: u64,
    /// Deliveries that never ran because the shutdown deadline passed.
    pub left: u64,
    /// Deliveries accepted and not yet settled.
    pub in_flight: u64,
    /// Events published that matched no subscription.
    pub unmatched: u64,
    /// Events handed back to their publisher because the bus was shutting down.
    pub refused: u64,
    /// Deliveries reported as stalled: still running past their `stall_after` (see
    /// [`BusBuilder::stall_after`](crate::BusBuilder::stall_after)). Each is counted once,
    /// and settles as any other.
    #[serde(default)]
    pub stalled: u64,
    /// Keys of ordered subscriptions held by a dead letter
    /// ([`hold_on_dead_letter`](crate::SubscribeOptions::hold_on_dead_letter)) that were
    /// released because the dead letter was evicted from the full ring.
    #[serde(default)]
    pub held_keys_evicted: u64,
    /// Panics caught in user code outside handlers, by where they happened (not terms of
    /// the ledger: each delivery concerned is settled as if the code had returned).
    pub callback_panics: CallbackPanics,
}

/// Makes [`Outcomes`], [`OutcomeCounters`] and their sums from one list of the terms.
macro_rules! outcomes {
    ($($term:ident),* $(,)?) => {
        /// The outcome terms of deliveries, as counted wherever deliveries settle or move on —
        /// a worker, a deferred delivery's settlement, shutdown's sweep, a subscription — and
        /// summed into [`BusStats`]: one type, added as a whole, so no place lists the terms
        /// again.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub(crate) struct Outcomes {
            $(pub(crate) $term: u64,)*
        }

        /// [`Outcomes`] as counters that other threads read.
        #[derive(Debug, Default)]
        pub(crate) struct OutcomeCounters {
            $(pub(crate) $term: AtomicU64,)*
        }

        impl OutcomeCounters {
            /// The counts now (each read `Relaxed`: the caller orders them against its own
            /// `settled` counter).
            pub(crate) fn read(&self) -> Outcomes {
                Outcomes {
                    $($term: self.$term.load(Ordering::Relaxed),)*
                }
            }
        }

        impl std::ops::AddAssign for Outcomes {
            fn add_assign(&mut self, o: Outcomes) {
                $(self.$term += o.$term;)*
            }
        }

        impl std::ops::AddAssign<Outcomes> for BusStats {
            fn add_assign(&mut self, o: Outcomes) {
                $(self.$term += o.$term;)*
            }
        }
    };
}

outcomes!(
    succeeded,
    failed,
    panicked,
    retried,
    dead_lettered,
    discarded,
    dropped,
    cancelled,
    left,
);

impl Outcomes {
    /// The deliveries these outcomes settled: failures and retries are steps on the way.
    pub(crate) fn settled(&self) -> u64 {
        self.succeeded
            + self.dead_lettered
            + self.discarded
            + self.dropped
            + self.cancelled
            + self.left
    }
}

/// What a counter of [`BusStats`] is to the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The deliveries accepted: the sum of the outcomes.
    Accepted,
    /// An outcome: a term of the sum.
    Outcome,
    /// Counted beside the ledger (attempts, events).
    Beside,
}

/// One counter of [`BusStats`], as every report prints it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Term {
    /// Its name in snake case (the field's name); Prometheus calls it
    /// `microbus_bus_<name>_total`, except `in_flight`, the gauge `microbus_in_flight`.
    pub(crate) name: &'static str,
    /// Its label in text reports.
    pub(crate) label: &'static str,
    /// What it counts.
    pub(crate) help: &'static str,
    pub(crate) role: Role,
    pub(crate) value: u64,
}

impl BusStats {
    /// Every counter, once: the accepted deliveries, the outcomes that sum to them, then what
    /// is counted beside the ledger. The shutdown report, the metrics table and Prometheus
    /// print from this list.
    pub(crate) fn terms(&self) -> [Term; 17] {
        let term = |name, label, help, role, value| Term {
            name,
            label,
            help,
            role,
            value,
        };
        use Role::{Accepted, Beside, Outcome};
        [
            term(
                "delivered",
                "accepted",
                "Deliveries accepted: each event published times the subscriptions it matched.",
                Accepted,
                self.delivered,
            ),
            term(
                "succeeded",
                "succeeded",
                "Deliveries whose handler returned Ok.",
                Outcome,
                self.succeeded,
            ),
            term(
                "dead_lettered",
                "dead-lettered",
                "Deliveries dead-lettered (evicted ones included).",
                Outcome,
                self.dead_lettered,
            ),
            term(
                "discarded",
                "discarded",
                "Failed deliveries dropped with dead letters off.",
                Outcome,
                self.discarded,
            ),
            term(
                "dropped",
                "dropped",
                "Failed deliveries whose failure said to drop the event.",
                Outcome,
                self.dropped,
            ),
            term(
                "cancelled",
                "cancelled",
                "Deliveries cancelled by an unsubscribe.",
                Outcome,
                self.cancelled,
            ),
            term(
                "abandoned",
                "abandoned",
                "Deliveries running or deferred when the shutdown deadline passed.",
                Outcome,
                self.abandoned,
            ),
            term(
                "left",
                "left",
                "Deliveries that never ran because the shutdown deadline passed.",
                Outcome,
                self.left,
            ),
            term(
                "in_flight",
                "in flight",
                "Deliveries accepted and not yet settled.",
                Outcome,
                self.in_flight,
            ),
            term(
                "failed",
                "failed attempts",
                "Failed attempts: handler errors and panics.",
                Beside,
                self.failed,
            ),
            term(
                "panicked",
                "panics",
                "Failed attempts that were panics.",
                Beside,
                self.panicked,
            ),
            term(
                "retried",
                "retries",
                "Retries scheduled.",
                Beside,
                self.retried,
            ),
            term(
                "dead_letters_evicted",
                "evicted",
                "Dead letters evicted from the full ring.",
                Beside,
                self.evicted,
            ),
            term(
                "unmatched",
                "unmatched events",
                "Events published that matched no subscription.",
                Beside,
                self.unmatched,
            ),
            term(
                "refused",
                "refused events",
                "Events handed back because the bus was shutting down.",
                Beside,
                self.refused,
            ),
            term(
                "stalled",
                "stalled deliveries",
                "Deliveries that ran past their stall_after.",
                Beside,
                self.stalled,
            ),
            term(
                "held_keys_evicted",
                "held keys released by eviction",
                "Keys held by a dead letter, released because it was evicted.",
                Beside,
                self.held_keys_evicted,
            ),
        ]
    }

    /// Whether every accepted delivery is accounted for by exactly one outcome.
    pub fn is_balanced(&self) -> bool {
        self.sum(Role::Accepted) == self.sum(Role::Outcome)
    }

    /// The sum of the terms that play `role`.
    pub(crate) fn sum(&self, role: Role) -> u64 {
        self.terms()
            .iter()
            .filter(|t| t.role == role)
            .map(|t| t.value)
            .sum()
    }

    /// The ledger as one line: `10 accepted = 8 succeeded + 1 dead-lettered + … + 1 in
    /// flight`.
    pub(crate) fn ledger_line(&self) -> String {
        let terms = self.terms();
        let show = |t: &Term| format!("{} {}", t.value, t.label);
        let accepted: Vec<String> = terms
            .iter()
            .filter(|t| t.role == Role::Accepted)
            .map(show)
            .collect();
        let outcomes: Vec<String> = terms
            .iter()
            .filter(|t| t.role == Role::Outcome)
            .map(show)
            .collect();
        format!("{} = {}", accepted.join(""), outcomes.join(" + "))
    }
}

/// A key of an ordered subscription that its dead letter holds (see
/// [`hold_on_dead_letter`](crate::SubscribeOptions::hold_on_dead_letter)): its later
/// deliveries wait until the dead letter is redriven, skipped, purged or evicted.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeldKey {
    /// The dead letter's id.
    pub dead_letter: u64,
    /// Its event's id.
    pub event_id: EventId,
    /// The subscription's id.
    pub subscription: u64,
    /// The subscribing service.
    pub service: String,
    /// The handler's name.
    pub handler: String,
    /// The key.
    pub key: u64,
    /// The deliveries waiting behind it.
    pub waiting: usize,
}

/// A delivery still running past its `stall_after`
/// ([`BusBuilder::stall_after`](crate::BusBuilder::stall_after),
/// [`SubscribeOptions::stall_after`](crate::SubscribeOptions::stall_after)): what
/// [`BusBuilder::on_stall`](crate::BusBuilder::on_stall) is given, and what
/// [`MetricsSnapshot::stalls`](crate::MetricsSnapshot::stalls) lists while it runs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct Stall {
    /// The worker running it (its index among all lanes' workers).
    pub worker: usize,
    /// The worker's lane.
    pub lane: String,
    /// The subscribing service.
    pub service: String,
    /// The handler's name.
    pub handler: String,
    /// The event's [`Event::NAME`](crate::Event::NAME).
    pub event: String,
    /// The event's id.
    pub event_id: EventId,
    /// How long it had been running when it was seen (at least its `stall_after`; the bus
    /// looks a few times per `stall_after`).
    pub running_for: Duration,
}

/// What shutdown gave up on at its deadline: a worker still running a handler, or user code
/// outside one (a tap, a hook, a sink, a tracker's callback, an event's `Serialize` or `Drop`),
/// or a deferred delivery ([`Context::defer`](crate::Context::defer)) not completed by then. A worker thread is
/// detached (a thread cannot be stopped from outside): it exits when that code returns, and
/// settles nothing more.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AbandonedDelivery {
    /// The detached worker thread's name, or `deferred` for a deferred delivery.
    pub worker: String,
    /// The lane of the worker, or of the deferred delivery's subscription.
    pub lane: String,
    /// The [`Event::NAME`](crate::Event::NAME) of the event (`?` when the worker was outside a handler).
    pub event: &'static str,
    /// The event's id (outside a handler: the event the worker ran last).
    pub event_id: Option<EventId>,
    /// The handler's name (empty when the worker was outside a handler).
    pub handler: String,
    /// Outside a handler, where the worker was: `hook`, `sink`, `tracker`, `tap`, `serde`,
    /// `drop` (the seams of [`CallbackPanics`]), or `bus` for the bus's own code; `None` in a
    /// handler or a deferred delivery.
    pub seam: Option<&'static str>,
    /// The deliveries this accounts for in [`BusStats::abandoned`] and [`BusStats::left`]: in
    /// a handler, the running one, those of its event after it (left) and those held for a
    /// retry (discarded); outside one, every delivery of the message the worker held; 1 for a
    /// deferred delivery.
    pub deliveries: u64,
}

/// What [`Bus::shutdown`](crate::Bus::shutdown) did: the final statistics, and what did not finish in time.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// The final counts; `in_flight` is 0 and the terms add up.
    pub stats: BusStats,
    /// Whether something accepted was not handled: the deadline passed first, or retries were
    /// given up because they were not due before it.
    pub deadline_passed: bool,
    /// Deliveries given up at the deadline, with their detached workers.
    pub abandoned: Vec<AbandonedDelivery>,
    /// User code that shutdown left to a thread of its own (trackers' callbacks, dead letters
    /// to make and hand to the hook and the sink, events to drop) and that had not finished
    /// by the deadline plus [`SHUTDOWN_GRACE`]: how many such jobs it cut off. That thread
    /// carries on; what it does later is not in the report.
    pub cut_off: u64,
    /// How long the shutdown took.
    pub elapsed: Duration,
    /// Per lane (the default one first): what shutdown found unfinished there.
    pub lanes: Vec<LaneReport>,
}

/// One lane's books at shutdown — what it accepted against what it settled — and what it shed
/// and left unfinished.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LaneReport {
    /// The lane's name.
    pub lane: String,
    /// Deliveries its gates let in.
    pub accepted: u64,
    /// Deliveries settled in it, under any outcome.
    pub settled: u64,
    /// Deliveries it shed because a shard was full (see
    /// [`Backpressure::Shed`](crate::Backpressure::Shed)).
    pub shed: u64,
    /// Deliveries shutdown found waiting in its channels and spill queues, or due for it on
    /// the timer, and settled (left, or dead-lettered).
    pub swept: u64,
    /// Deliveries held by its workers that shutdown detached at the deadline, and its
    /// deferred deliveries not completed by then.
    pub abandoned: u64,
}

impl LaneReport {
    /// Whether the lane settled every delivery it accepted.
    pub fn is_balanced(&self) -> bool {
        self.accepted == self.settled
    }
}

impl ShutdownReport {
    /// Whether the accepted deliveries equal the sum of the outcomes.
    pub fn is_balanced(&self) -> bool {
        self.stats.in_flight == 0 && self.stats.is_balanced()
    }
}

impl fmt::Display for ShutdownReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.stats;
        writeln!(f, "shutdown in {:?}", self.elapsed)?;
        let rows = s.terms().map(|t| (t.label, t.value));
        let more = [
            ("callback panics", s.callback_panics.total()),
            ("cut off", self.cut_off),
        ];
        for (label, value) in rows.into_iter().chain(more) {
            writeln!(f, "  {label:<17}{value:>12}")?;
        }
        for a in &self.abandoned {
            let id = a.event_id.map(|id| id.to_string()).unwrap_or_default();
            match a.seam {
                None => writeln!(
                    f,
                    "  abandoned: {} {id} in {} on {}",
                    a.event, a.handler, a.worker
                )?,
                Some(seam) => writeln!(
                    f,
                    "  detached: {} in {seam} code after {id}, holding {} deliveries",
                    a.worker, a.deliveries
                )?,
            }
        }
        if self.lanes.len() > 1 {
            for l in &self.lanes {
                writeln!(
                    f,
                    "  lane {}: {} accepted, {} settled; {} shed, {} swept, {} abandoned",
                    l.lane, l.accepted, l.settled, l.shed, l.swept, l.abandoned
                )?;
            }
        }
        Ok(())
    }
}

//! The delivery ledger: what was accepted, and what was settled.
//!
//! Ground rules: each shard has one [`Gate`] word that a publisher updates with a single atomic
//! add, before it sends: the add counts the event's deliveries as accepted and, in the same
//! operation, tells the publisher whether the gate is closed.
//!
//! ```text
//!  63                                              1   0
//! ┌────────────────────────────────────────────────┬───┐
//! │ deliveries accepted, mod 2^63                  │ closed
//! └────────────────────────────────────────────────┴───┘
//! ```
//!
//! A publisher whose event does not go into the channel after all (the gate was closed, the
//! shard stayed full, shutdown woke it) gives its count back by adding to the shard's
//! `refunded` counter, off the hot path. Events that handlers publish are accepted with the
//! same add, before their parent delivery is settled. Each worker counts the deliveries it
//! settled in a counter that only it writes.
//!
//! At every instant `accepted - refunded - settled` is the number of deliveries outstanding
//! (counted, not yet settled): an event is counted before it is sent, and settled or refunded
//! after. [`Quiescence`] proves that number was zero at one instant with a double collect:
//! it reads every gate's (accepted, refunded) pair, then the settled counters, then the pairs
//! again; all of them only grow, so equal pairs mean nothing changed in between.

use crate::sync::{AtomicU64, Ordering};

const CLOSED: u64 = 1;
const ACCEPTED_SHIFT: u32 = 1;
/// Accepted counts are kept modulo 2^63; differences are taken in that ring.
pub(crate) const COUNT_MASK: u64 = (1 << 63) - 1;

/// The intake gate and the accepted and refunded counts of one shard.
pub(crate) struct Gate {
    word: AtomicU64,
    refunded: AtomicU64,
}

/// One reading of a [`Gate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GateState {
    pub(crate) closed: bool,
    pub(crate) accepted: u64,
    pub(crate) refunded: u64,
}

impl GateState {
    /// Deliveries counted in and not given back, modulo 2^63.
    #[inline]
    pub(crate) fn net(self) -> u64 {
        self.accepted.wrapping_sub(self.refunded) & COUNT_MASK
    }
}

impl Gate {
    pub(crate) fn new() -> Gate {
        Gate {
            word: AtomicU64::new(0),
            refunded: AtomicU64::new(0),
        }
    }

    /// Counts `deliveries` in; `false` when the gate is closed, in which case nothing stays
    /// counted (a publisher that raced the closing refunds at once).
    #[inline]
    pub(crate) fn enter(&self, deliveries: usize) -> bool {
        // Once closed, stay off the count: a refund would only be a moment later.
        if self.word.load(Ordering::Relaxed) & CLOSED != 0 {
            return false;
        }
        let before = self
            .word
            .fetch_add((deliveries as u64) << ACCEPTED_SHIFT, Ordering::SeqCst);
        if before & CLOSED != 0 {
            self.refund(deliveries);
            return false;
        }
        true
    }

    /// Gives back `deliveries` counted by [`enter`](Self::enter) whose event did not go into
    /// the channel.
    #[inline]
    pub(crate) fn refund(&self, deliveries: usize) {
        self.refunded.fetch_add(deliveries as u64, Ordering::SeqCst);
    }

    /// Counts `deliveries` in whether or not the gate is closed: for events that handlers
    /// publish, which are accepted while their parent delivery is still outstanding.
    #[inline]
    pub(crate) fn accept(&self, deliveries: usize) {
        self.word
            .fetch_add((deliveries as u64) << ACCEPTED_SHIFT, Ordering::SeqCst);
    }

    /// Closes the gate: every later `enter` fails.
    pub(crate) fn close(&self) {
        self.word.fetch_or(CLOSED, Ordering::SeqCst);
    }

    #[inline]
    pub(crate) fn read(&self) -> GateState {
        let word = self.word.load(Ordering::SeqCst);
        GateState {
            closed: word & CLOSED != 0,
            accepted: word >> ACCEPTED_SHIFT,
            refunded: self.refunded.load(Ordering::SeqCst) & COUNT_MASK,
        }
    }
}

/// The outstanding-delivery count implied by a net accepted sum and a settled sum, read as a
/// signed number in the 63-bit ring (a live reading may see a settlement before the count it
/// settles, since the two are read at different moments).
#[inline]
pub(crate) fn outstanding(net: u64, settled: u64) -> i64 {
    let diff = net.wrapping_sub(settled) & COUNT_MASK;
    if diff >= 1 << 62 {
        -((COUNT_MASK - diff + 1) as i64)
    } else {
        diff as i64
    }
}

/// The sum of the gates' net counts, modulo 2^63.
pub(crate) fn net_sum<'a>(gates: impl Iterator<Item = &'a Gate>) -> u64 {
    gates.fold(0u64, |sum, g| sum.wrapping_add(g.read().net())) & COUNT_MASK
}

/// Reads of the gates and settled counters that decide whether the bus is quiescent.
pub(crate) struct Quiescence;

impl Quiescence {
    /// Whether, at one instant during the call, every delivery counted in was settled or
    /// refunded.
    pub(crate) fn check<'a>(
        gates: impl Iterator<Item = &'a Gate> + Clone,
        settled: impl FnOnce() -> u64,
    ) -> bool {
        let first: Vec<GateState> = gates.clone().map(Gate::read).collect();
        let settled = settled();
        let unchanged = gates.zip(&first).all(|(gate, before)| {
            let now = gate.read();
            now.accepted == before.accepted && now.refunded == before.refunded
        });
        let net = first.iter().fold(0u64, |sum, g| sum.wrapping_add(g.net())) & COUNT_MASK;
        unchanged && outstanding(net, settled) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enter_counts_and_refunds_keep_the_net() {
        let gate = Gate::new();
        assert!(gate.enter(3));
        assert!(gate.enter(1));
        gate.refund(1);
        gate.accept(2);
        assert_eq!(
            gate.read(),
            GateState {
                closed: false,
                accepted: 6,
                refunded: 1
            }
        );
        assert_eq!(gate.read().net(), 5);
    }

    #[test]
    fn a_closed_gate_refuses_without_counting() {
        let gate = Gate::new();
        assert!(gate.enter(1));
        gate.close();
        assert!(!gate.enter(2));
        gate.accept(1);
        let state = gate.read();
        assert!(state.closed);
        assert_eq!((state.accepted, state.refunded, state.net()), (2, 0, 2));
    }

    #[test]
    fn counts_wrap_in_the_ring() {
        let gate = Gate {
            word: AtomicU64::new(COUNT_MASK << ACCEPTED_SHIFT),
            refunded: AtomicU64::new(0),
        };
        assert!(gate.enter(3));
        let state = gate.read();
        assert_eq!(state.accepted, 2);
        assert!(!state.closed);
        assert_eq!(outstanding(state.net(), COUNT_MASK), 3);
    }

    #[test]
    fn outstanding_is_signed_in_the_ring() {
        assert_eq!(outstanding(10, 4), 6);
        assert_eq!(outstanding(4, 10), -6);
        assert_eq!(outstanding(0, 0), 0);
    }

    #[test]
    fn quiescence_needs_settled_to_match_the_net_count() {
        let gates = [Gate::new(), Gate::new()];
        assert!(Quiescence::check(gates.iter(), || 0));
        assert!(gates[0].enter(2));
        gates[1].accept(1);
        assert!(!Quiescence::check(gates.iter(), || 2));
        assert!(Quiescence::check(gates.iter(), || 3));
        assert!(gates[1].enter(4));
        assert!(!Quiescence::check(gates.iter(), || 3));
        gates[1].refund(4);
        assert!(Quiescence::check(gates.iter(), || 3));
        assert_eq!(net_sum(gates.iter()), 3);
    }

    #[test]
    fn a_change_between_the_collects_is_not_quiescence() {
        let gates = [Gate::new()];
        // The settled counter is read between the collects; an event counted in meanwhile
        // (and settled at once) makes the collects differ.
        assert!(!Quiescence::check(gates.iter(), || {
            gates[0].accept(1);
            1
        }));
        assert!(Quiescence::check(gates.iter(), || 1));
    }
}

/// Loom models of the ledger: `RUSTFLAGS="--cfg loom" cargo test --release --lib loom_`.
#[cfg(all(test, loom))]
mod loom_models {
    use super::*;
    use crate::sync::AtomicBool;
    use loom::sync::Arc;
    use loom::thread;

    /// A publisher counts an event in on one shard; its handler publishes a follow-up on the
    /// other shard (counted in before the parent is settled) and the worker settles both, while
    /// `flush` checks for quiescence. A check that starts after the parent was counted and
    /// passes saw the follow-up handled too: the double collect catches a count that moved
    /// between the reads of the two gates.
    #[test]
    fn loom_flush_never_passes_an_outstanding_delivery() {
        loom::model(|| {
            let gates = Arc::new([Gate::new(), Gate::new()]);
            let settled = Arc::new(AtomicU64::new(0));
            let sent = Arc::new(AtomicBool::new(false));
            let child_handled = Arc::new(AtomicBool::new(false));
            let publisher = {
                let (gates, sent) = (gates.clone(), sent.clone());
                thread::spawn(move || {
                    assert!(gates[1].enter(1));
                    // Into the channel.
                    sent.store(true, Ordering::Release);
                })
            };
            let worker = {
                let (gates, sent, settled, child_handled) = (
                    gates.clone(),
                    sent.clone(),
                    settled.clone(),
                    child_handled.clone(),
                );
                thread::spawn(move || {
                    while !sent.load(Ordering::Acquire) {
                        thread::yield_now();
                    }
                    // The parent's handler succeeds: its follow-up is counted in, then the
                    // parent is settled; then the follow-up runs and is settled.
                    gates[0].accept(1);
                    settled.store(1, Ordering::Release);
                    child_handled.store(true, Ordering::Relaxed);
                    settled.store(2, Ordering::Release);
                })
            };
            // Flush starts once the parent was sent (counted in before it).
            publisher.join().unwrap();
            if Quiescence::check(gates.iter(), || settled.load(Ordering::Acquire)) {
                assert!(
                    child_handled.load(Ordering::Relaxed),
                    "flush passed a delivery still outstanding"
                );
            }
            worker.join().unwrap();
            assert!(Quiescence::check(gates.iter(), || settled.load(Ordering::Acquire)));
        });
    }

    /// Shutdown closes the gate while a publisher enters: the event is accepted (and counted)
    /// or handed back (and not counted), never both; nothing is accepted after the close (the
    /// count shutdown reads then covers every event accepted), and a publisher that starts
    /// after the close returned is refused.
    #[test]
    fn loom_closing_the_gate_accepts_or_refuses_each_event_once() {
        loom::model(|| {
            let gate = Arc::new(Gate::new());
            let closed = Arc::new(AtomicBool::new(false));
            let publisher = {
                let (gate, closed) = (gate.clone(), closed.clone());
                thread::spawn(move || {
                    let after_close = closed.load(Ordering::Acquire);
                    let accepted = gate.enter(1);
                    assert!(!(after_close && accepted), "accepted after the gate closed");
                    accepted
                })
            };
            gate.close();
            // What shutdown counts as accepted: nothing is counted in for good after this.
            let at_close = gate.read().net();
            closed.store(true, Ordering::Release);
            let accepted = publisher.join().unwrap();
            let state = gate.read();
            assert!(state.closed);
            assert_eq!(state.net(), u64::from(accepted), "{state:?}");
            assert!(
                state.net() <= at_close,
                "accepted after the close: {state:?}"
            );
        });
    }

    /// A publish to two lanes enters both lanes' gates before it sends anything (refunding the
    /// first when the second is closed), while shutdown closes the gates one after the other:
    /// the event is admitted in both lanes or in neither — shutdown never takes one lane's
    /// deliveries of an event it hands back, nor hands back an event one lane has.
    #[test]
    fn loom_a_publish_to_two_lanes_is_admitted_in_both_or_neither() {
        loom::model(|| {
            let gates = Arc::new([Gate::new(), Gate::new()]);
            let publisher = {
                let gates = gates.clone();
                thread::spawn(move || {
                    if !gates[0].enter(2) {
                        return false;
                    }
                    if !gates[1].enter(1) {
                        gates[0].refund(2);
                        return false;
                    }
                    true
                })
            };
            gates[0].close();
            gates[1].close();
            let admitted = publisher.join().unwrap();
            let (first, second) = (gates[0].read().net(), gates[1].read().net());
            if admitted {
                assert_eq!((first, second), (2, 1));
            } else {
                assert_eq!((first, second), (0, 0));
            }
        });
    }
}

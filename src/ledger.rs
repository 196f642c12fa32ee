//! The delivery ledger: what was accepted, and what was settled.
//!
//! Ground rules: each shard has one [`Gate`] word that publishers update with one atomic
//! read-modify-write on the way in and one on the way out. It packs
//!
//! ```text
//!  63                          22 21                 1   0
//! ┌─────────────────────────────┬────────────────────┬───┐
//! │ deliveries accepted mod 2^42 │ publishers inside  │ closed
//! └─────────────────────────────┴────────────────────┴───┘
//! ```
//!
//! A publisher enters (`+2`), learns from the same operation whether the gate is closed, sends,
//! and leaves either accepting its deliveries (`+n<<22 - 2`) or not (`-2`). Shutdown closes
//! every gate (`|1`, ordered with the entries because they are operations on one word), then
//! waits for the publishers inside to leave: after that, the accepted count is final except for
//! events that handlers publish, which are accepted directly (`+n<<22`) before their parent
//! delivery is settled.
//!
//! Each worker counts the deliveries it settled in a counter that only it writes. The bus is
//! quiescent when no publisher is inside any gate and the accepted counts sum to the settled
//! counts; [`Quiescence`] checks that with a double collect of the (monotonic) accepted counts
//! around the settled counts, which proves that at one instant nothing was outstanding.

use crate::sync::{AtomicU64, Ordering};

const CLOSED: u64 = 1;
const INSIDE: u64 = 2;
const INSIDE_MASK: u64 = ((1 << 21) - 1) << 1;
const ACCEPTED_SHIFT: u32 = 22;
/// Accepted counts are kept modulo 2^42; differences are taken in that ring.
pub(crate) const COUNT_MASK: u64 = (1 << 42) - 1;

/// The intake gate and accepted count of one shard.
pub(crate) struct Gate(AtomicU64);

/// One reading of a [`Gate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GateState {
    pub(crate) closed: bool,
    pub(crate) inside: u64,
    pub(crate) accepted: u64,
}

impl Gate {
    pub(crate) fn new() -> Gate {
        Gate(AtomicU64::new(0))
    }

    /// Enters the gate; `false` when it is closed (and the caller is not inside).
    #[inline]
    pub(crate) fn enter(&self) -> bool {
        let before = self.0.fetch_add(INSIDE, Ordering::SeqCst);
        debug_assert!(
            before & INSIDE_MASK != INSIDE_MASK,
            "too many publishers inside"
        );
        if before & CLOSED != 0 {
            self.0.fetch_sub(INSIDE, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Leaves the gate, accepting `deliveries`.
    #[inline]
    pub(crate) fn leave_accepted(&self, deliveries: usize) {
        let delta = ((deliveries as u64) << ACCEPTED_SHIFT).wrapping_sub(INSIDE);
        self.0.fetch_add(delta, Ordering::SeqCst);
    }

    /// Leaves the gate without accepting anything (the event went back to the publisher).
    pub(crate) fn leave_refused(&self) {
        self.0.fetch_sub(INSIDE, Ordering::SeqCst);
    }

    /// Accepts `deliveries` without entering: for events published by handlers, which are
    /// accepted while their parent delivery is still outstanding.
    #[inline]
    pub(crate) fn accept(&self, deliveries: usize) {
        self.0
            .fetch_add((deliveries as u64) << ACCEPTED_SHIFT, Ordering::SeqCst);
    }

    /// Closes the gate: every later `enter` fails.
    pub(crate) fn close(&self) {
        self.0.fetch_or(CLOSED, Ordering::SeqCst);
    }

    pub(crate) fn read(&self) -> GateState {
        let word = self.0.load(Ordering::SeqCst);
        GateState {
            closed: word & CLOSED != 0,
            inside: (word & INSIDE_MASK) >> 1,
            accepted: word >> ACCEPTED_SHIFT,
        }
    }
}

/// The outstanding-delivery count implied by an accepted sum and a settled sum, read as a
/// signed number in the 42-bit ring (settled can run ahead of accepted for an instant: a worker
/// may settle a delivery before its publisher has left the gate).
pub(crate) fn outstanding(accepted: u64, settled: u64) -> i64 {
    let diff = accepted.wrapping_sub(settled) & COUNT_MASK;
    if diff >= 1 << 41 {
        diff as i64 - (1 << 42)
    } else {
        diff as i64
    }
}

/// Reads of the gates and settled counters that decide whether the bus is quiescent.
pub(crate) struct Quiescence;

impl Quiescence {
    /// The sum of accepted counts, or `None` while a publisher is inside a gate.
    fn accepted<'a>(gates: impl Iterator<Item = &'a Gate>) -> Option<u64> {
        let mut sum = 0u64;
        for gate in gates {
            let state = gate.read();
            if state.inside != 0 {
                return None;
            }
            sum = sum.wrapping_add(state.accepted);
        }
        Some(sum & COUNT_MASK)
    }

    /// Whether, at one instant during the call, every accepted delivery was settled and no
    /// publisher was inside a gate.
    pub(crate) fn check<'a>(
        gates: impl Iterator<Item = &'a Gate> + Clone,
        settled: impl FnOnce() -> u64,
    ) -> bool {
        let Some(first) = Self::accepted(gates.clone()) else {
            return false;
        };
        let settled = settled();
        let Some(second) = Self::accepted(gates) else {
            return false;
        };
        first == second && outstanding(first, settled) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enter_leave_counts() {
        let gate = Gate::new();
        assert!(gate.enter());
        assert!(gate.enter());
        assert_eq!(
            gate.read(),
            GateState {
                closed: false,
                inside: 2,
                accepted: 0
            }
        );
        gate.leave_accepted(3);
        gate.leave_refused();
        gate.accept(2);
        assert_eq!(
            gate.read(),
            GateState {
                closed: false,
                inside: 0,
                accepted: 5
            }
        );
    }

    #[test]
    fn closed_gate_refuses_and_keeps_counts() {
        let gate = Gate::new();
        assert!(gate.enter());
        gate.close();
        assert!(!gate.enter());
        let state = gate.read();
        assert!(state.closed);
        assert_eq!(state.inside, 1);
        gate.leave_accepted(1);
        assert_eq!(
            gate.read(),
            GateState {
                closed: true,
                inside: 0,
                accepted: 1
            }
        );
    }

    #[test]
    fn accepted_count_wraps_without_touching_other_fields() {
        let gate = Gate(AtomicU64::new(COUNT_MASK << ACCEPTED_SHIFT));
        assert!(gate.enter());
        gate.leave_accepted(3);
        let state = gate.read();
        assert_eq!(state.accepted, 2);
        assert_eq!(state.inside, 0);
        assert!(!state.closed);
        assert_eq!(outstanding(2, COUNT_MASK), 3);
    }

    #[test]
    fn outstanding_is_signed_in_the_ring() {
        assert_eq!(outstanding(10, 4), 6);
        assert_eq!(outstanding(4, 10), -6);
        assert_eq!(outstanding(0, 0), 0);
    }

    #[test]
    fn quiescence_needs_equal_counts_and_nobody_inside() {
        let gates = [Gate::new(), Gate::new()];
        assert!(Quiescence::check(gates.iter(), || 0));
        gates[0].accept(2);
        gates[1].accept(1);
        assert!(!Quiescence::check(gates.iter(), || 2));
        assert!(Quiescence::check(gates.iter(), || 3));
        assert!(gates[1].enter());
        assert!(!Quiescence::check(gates.iter(), || 3));
        gates[1].leave_refused();
        assert!(Quiescence::check(gates.iter(), || 3));
    }
}

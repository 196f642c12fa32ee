//! How an idle worker waits for its next message.
//!
//! Under [`WaitStrategy::Block`] a worker that finds its channel empty parks in it, after the
//! channel's own short spin. With a publisher running flat out on another core that spin is
//! what slows both down: each poll takes the channel's lines (the slot being written, the
//! tail) away from the publisher as it writes them, and the worker drains the channel one
//! message at a time. A worker that sees the publisher stream waits in a gap instead: it looks
//! again after [`GAP`], staying off the channel until then, so that the channel fills some
//! messages ahead and is drained in runs. A publisher that waits for each message to be
//! handled (one event, then the next, or bursts of a few) would only wait longer for it, so
//! the gap is used only while it pays: a run of at least [`STREAMING_RUN`] messages after it.
//! A worker that is not using gaps tries one every [`TRY_EVERY`] idle spells, which costs such
//! a publisher one wait of up to [`GAP`] in that many.

use super::*;

/// How many more times a worker using gaps looks at its channel before it parks.
const LOOKS: u32 = 1;

/// How long it stays off the channel before each of those looks, in nanoseconds.
const GAP: u64 = 3_000;

/// The messages that must come in one run after a gap for the worker to keep using gaps.
const STREAMING_RUN: u32 = 16;

/// How often, in idle spells, a worker that is not using gaps tries them.
const TRY_EVERY: u32 = 1_024;

/// A worker's idle pacing under [`WaitStrategy::Block`].
#[derive(Default)]
pub(super) struct Pacing {
    /// Messages received since the worker last found its channel empty.
    run: u32,
    /// Set while the messages come faster than the worker takes them one by one.
    gapped: bool,
    /// Set for the idle spell that tries the gaps.
    trying: bool,
    /// Idle spells since the last try.
    spells: u32,
}

impl Pacing {
    /// Counts a message received.
    #[inline]
    pub(super) fn received(&mut self) {
        self.run = self.run.saturating_add(1);
    }

    /// The worker found its channel empty: looks at it again after a gap, if that pays, before
    /// the caller parks in it.
    pub(super) fn wait(&mut self, rx: &Receiver<Msg>) -> Result<Msg, TryRecvError> {
        if !self.gap() {
            return Err(TryRecvError::Empty);
        }
        let received = look_again(rx);
        if let Err(TryRecvError::Empty) = received {
            self.missed();
        }
        received
    }

    /// Nothing came within the gap: the run that follows (after the worker parked and was
    /// woken, or a publisher that shares its CPU ran) says nothing about gaps.
    fn missed(&mut self) {
        self.gapped = false;
        self.trying = false;
    }

    /// Whether this idle spell waits in a gap: while the run since the last one shows a
    /// streaming publisher, or as the spell that tries it.
    fn gap(&mut self) -> bool {
        let run = std::mem::take(&mut self.run);
        if self.gapped || self.trying {
            self.gapped = run >= STREAMING_RUN;
            self.trying = false;
        }
        if !self.gapped {
            self.spells += 1;
            if self.spells < TRY_EVERY {
                return false;
            }
            self.spells = 0;
            self.trying = true;
        }
        true
    }
}

/// Looks at `rx` [`LOOKS`] more times, each after [`GAP`], staying off the channel's lines
/// until then. The gap is spun, not yielded: a yield can hand the CPU to another process for a
/// whole time slice. (A publisher that shares the worker's CPU never makes it keep its gaps:
/// nothing comes in while the worker spins.)
fn look_again(rx: &Receiver<Msg>) -> Result<Msg, TryRecvError> {
    for _ in 0..LOOKS {
        let until = unix_nanos().saturating_add(GAP);
        while unix_nanos() < until {
            for _ in 0..16 {
                std::hint::spin_loop();
            }
        }
        match rx.try_recv() {
            Err(TryRecvError::Empty) => {}
            other => return other,
        }
    }
    Err(TryRecvError::Empty)
}

/// Polls `rx` for up to `spin` before the worker parks, busy-waiting between polls
/// ([`WaitStrategy::SpinThenPark`]).
pub(super) fn spin_for(rx: &Receiver<Msg>, spin: Duration) -> Result<Msg, TryRecvError> {
    let spin = u64::try_from(spin.as_nanos()).unwrap_or(u64::MAX);
    let deadline = unix_nanos().saturating_add(spin);
    let mut polls = 0u32;
    loop {
        match rx.try_recv() {
            Err(TryRecvError::Empty) => {}
            other => return other,
        }
        std::hint::spin_loop();
        polls = polls.wrapping_add(1);
        if polls.is_multiple_of(64) && unix_nanos() >= deadline {
            return Err(TryRecvError::Empty);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` messages, then the channel found empty: whether that spell waits in a gap.
    fn spell(pacing: &mut Pacing, n: u32) -> bool {
        for _ in 0..n {
            pacing.received();
        }
        pacing.gap()
    }

    #[test]
    fn a_worker_tries_a_gap_once_every_so_many_spells_and_keeps_it_only_while_runs_are_long() {
        let mut pacing = Pacing::default();
        // One message a spell (a publisher that waits for each): a gap once in TRY_EVERY.
        let tried: Vec<u32> = (1..=3 * TRY_EVERY)
            .filter(|_| spell(&mut pacing, 1))
            .collect();
        assert_eq!(tried.len(), 3);
        // A streaming publisher: the run after the tried gap is long, so gaps stay.
        let mut pacing = Pacing::default();
        for _ in 1..TRY_EVERY {
            assert!(!spell(&mut pacing, 1));
        }
        assert!(spell(&mut pacing, 1), "the spell that tries a gap");
        assert!(
            spell(&mut pacing, STREAMING_RUN),
            "a long run after the gap keeps it"
        );
        assert!(spell(&mut pacing, 200));
        // The publisher slows down: one short run and the gaps stop until the next try.
        assert!(!spell(&mut pacing, STREAMING_RUN - 1));
        for _ in 2..TRY_EVERY {
            assert!(
                !spell(&mut pacing, 100),
                "long runs without a gap do not turn it on"
            );
        }
        assert!(spell(&mut pacing, 1), "the next try");
        assert!(!spell(&mut pacing, 3), "a short run after it");
        // A try whose gap brought nothing (the worker then parked, or its CPU went to a
        // publisher that shares it): the long run after the wake-up does not turn gaps on.
        for _ in 2..TRY_EVERY {
            assert!(!spell(&mut pacing, 1));
        }
        assert!(spell(&mut pacing, 1), "a try");
        pacing.missed();
        assert!(!spell(&mut pacing, 1_024));
    }
}

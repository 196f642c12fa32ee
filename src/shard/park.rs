//! Parking: the deliveries of a paused subscription wait on their shard, in the order they
//! came, holding no worker and spending no attempt, until the subscription is resumed.
//!
//! A worker parks a delivery instead of running it while its subscription
//! [`holds`](SubMeta::holds), or while that subscription already has deliveries parked on
//! this shard (so that a newer one never overtakes them). `resume` sets the shard's `release`
//! flag; the worker, before it takes its next message, runs what it parked, oldest first.
//! Parked deliveries are outstanding: shutdown takes them at its deadline, once the worker has
//! stopped, and dead-letters them like retries not yet due.

use super::*;
use crate::meta::{BREAKER, PAUSED};

/// The deliveries parked on one shard: per subscription, in arrival order.
#[derive(Default)]
pub(crate) struct Parked {
    queues: Vec<(u64, VecDeque<Retry>)>,
}

impl Parked {
    fn queue(&mut self, sub: u64) -> &mut VecDeque<Retry> {
        let at = match self.queues.iter().position(|(id, _)| *id == sub) {
            Some(at) => at,
            None => {
                self.queues.push((sub, VecDeque::new()));
                self.queues.len() - 1
            }
        };
        &mut self.queues[at].1
    }

    /// The oldest delivery parked for `sub`, unless its subscription holds them still — but
    /// for a half-open breaker's probe (then `true`, the probe taken).
    fn next(&mut self, sub: u64) -> Option<(Retry, bool)> {
        let at = self.queues.iter().position(|(id, _)| *id == sub)?;
        let queue = &mut self.queues[at].1;
        let front = queue.front()?;
        let meta = (front.ops.meta)(&front.sub);
        let hold = meta.hold.load(Ordering::SeqCst);
        let probe = hold & BREAKER != 0;
        if hold & PAUSED != 0 || (probe && !meta.breaker.as_ref().is_some_and(|b| b.take_probe())) {
            return None;
        }
        let next = queue.pop_front()?;
        if queue.is_empty() {
            self.queues.swap_remove(at);
        }
        Some((next, probe))
    }
}

impl WorkerShared {
    /// How many deliveries are held back on the shard: parked (by a paused subscription or an
    /// open breaker), or waiting behind their keys' heads.
    #[cfg(feature = "testing")]
    pub(crate) fn held_back(&self) -> usize {
        let parked: usize = self.parked.lock().queues.iter().map(|(_, q)| q.len()).sum();
        parked + self.waiting.lock().len()
    }

    /// The earliest time a breaker holding deliveries parked on the shard half-opens.
    pub(crate) fn breaker_due(&self) -> Option<Instant> {
        let parked = self.parked.lock();
        parked
            .queues
            .iter()
            .filter_map(|(_, q)| {
                let r = q.front()?;
                let meta = (r.ops.meta)(&r.sub);
                meta.breaker.as_ref().and_then(|b| b.due())
            })
            .min()
    }

    /// How many deliveries are parked on the shard that cannot run before `deadline` (`None`:
    /// that wait on the clock at all, under a manual clock): those of paused subscriptions,
    /// and of breakers open past it.
    pub(crate) fn parked_past(&self, deadline: Option<Instant>) -> usize {
        let parked = self.parked.lock();
        parked
            .queues
            .iter()
            .filter(|(_, q)| {
                q.front().is_some_and(|r| {
                    let meta = (r.ops.meta)(&r.sub);
                    meta.is_paused()
                        || meta
                            .breaker
                            .as_ref()
                            .and_then(|b| b.due())
                            .is_some_and(|due| deadline.is_none_or(|d| due > d))
                })
            })
            .map(|(_, q)| q.len())
            .sum()
    }

    /// Takes every delivery parked on the shard or waiting behind its key's head (shutdown,
    /// once the worker has stopped, or was detached).
    pub(crate) fn take_parked(&self, core: &Core) -> Vec<Retry> {
        let queues = std::mem::take(&mut self.parked.lock().queues);
        let mut taken: Vec<Retry> = queues.into_iter().flat_map(|(_, q)| q).collect();
        // And those waiting behind their keys' heads.
        taken.extend(self.waiting.lock().take());
        for retry in &taken {
            unparked(core, (retry.ops.meta)(&retry.sub));
        }
        taken
    }
}

/// Counts a delivery of `meta` parked; the count reaching its capacity holds back publishers.
pub(super) fn parked(core: &Core, meta: &SubMeta) {
    if meta.parked.fetch_add(1, Ordering::Relaxed) + 1 == meta.park_capacity {
        core.parks_full.fetch_add(1, Ordering::SeqCst);
    }
}

/// Counts a delivery of `meta` no longer parked.
pub(super) fn unparked(core: &Core, meta: &SubMeta) {
    if meta.parked.fetch_sub(1, Ordering::Relaxed) == meta.park_capacity {
        core.parks_full.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Worker<'_> {
    /// Whether a delivery to `meta`'s subscription parks instead of running: one load and one
    /// comparison while nothing is paused or parked.
    #[inline]
    pub(super) fn must_park(&mut self, meta: &SubMeta) -> bool {
        (meta.holds() || !self.parking.is_empty()) && self.must_park_slow(meta)
    }

    #[cold]
    #[inline(never)]
    fn must_park_slow(&mut self, meta: &SubMeta) -> bool {
        if self.probing == Some(meta.id) {
            return false;
        }
        let hold = meta.hold.load(Ordering::SeqCst);
        let queued = self.releasing != Some(meta.id) && self.parking.contains(&meta.id);
        if hold & PAUSED != 0 || (queued && hold != 0) {
            return true;
        }
        if hold & BREAKER != 0 {
            // Half-open: the first delivery a worker reaches is the probe (on a shard where
            // older ones are parked, the oldest is, on release).
            if !queued && meta.breaker.as_ref().is_some_and(|b| b.take_probe()) {
                self.probing = Some(meta.id);
                return false;
            }
            return true;
        }
        queued
    }

    /// Parks `retry` (a delivery not run, at the attempt it is due to run) behind the others
    /// of its subscription on this shard — or ahead of them: a failed probe, the oldest.
    pub(super) fn park(&mut self, retry: Retry, first_in_line: bool) {
        let sub = retry.subscription();
        parked(self.core, (retry.ops.meta)(&retry.sub));
        let mut queues = self.shared.parked.lock();
        match first_in_line {
            true => queues.queue(sub).push_front(retry),
            false => queues.queue(sub).push_back(retry),
        }
        drop(queues);
        if !self.parking.contains(&sub) {
            self.parking.push(sub);
        }
        self.shared.hand_off(1);
    }

    /// Runs what is parked on this shard for subscriptions that no longer hold it, each
    /// subscription's oldest first, before any newer delivery of theirs.
    #[cold]
    #[inline(never)]
    pub(super) fn release_parked(&mut self) -> Flow {
        self.shared.releasing.store(true, Ordering::SeqCst);
        let flow = self.run_released();
        self.shared.releasing.store(false, Ordering::SeqCst);
        flow
    }

    fn run_released(&mut self) -> Flow {
        self.shared.release.store(false, Ordering::SeqCst);
        self.take_key_releases();
        for sub in self.parking.clone() {
            loop {
                let next = self.shared.parked.lock().next(sub);
                let Some((retry, probe)) = next else {
                    break;
                };
                unparked(self.core, (retry.ops.meta)(&retry.sub));
                self.releasing = Some(sub);
                if probe {
                    self.probing = Some(sub);
                }
                let flow = self.handle(Work::Retry(retry));
                self.releasing = None;
                self.probing = None;
                if flow != Flow::Continue {
                    return flow;
                }
            }
        }
        let parked = self.shared.parked.lock();
        self.parking
            .retain(|sub| parked.queues.iter().any(|(id, _)| id == sub));
        Flow::Continue
    }
}

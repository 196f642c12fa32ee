//! Ordered subscriptions: at most one delivery per key in progress — running, deferred, or
//! failed and waiting for its retry — and the key's later deliveries waiting behind it, in
//! the order they came.
//!
//! A key maps to one shard of each lane, so the heads are the worker's own: a map from
//! (subscription, key) to the key's *head* (the event in progress). A key enters the map only
//! when its delivery does not settle while it runs (it failed and waits for a retry, or was
//! deferred); a delivery that succeeds at once costs the check that the map is empty. The
//! deliveries waiting behind a head are in the shard's `waiting` queues (shared, so that
//! shutdown sweeps them and reports count them). When the head settles, the next waiting
//! delivery becomes the head and goes to the worker's own overflow queue, which it runs before
//! its next message. A head settled on another thread (a deferral completed, a dead letter
//! skipped) is reported through the shard's `key_releases`. Waiting deliveries are parked
//! work: counted against the subscription's park capacity, dead-lettered at shutdown.

use std::collections::HashMap;

use super::*;
use crate::stats::HeldKey;

/// The keys in progress on a worker, by (subscription, key): the event whose delivery is in
/// progress.
pub(crate) type Keys = HashMap<(u64, u64), EventId>;

/// The deliveries waiting behind their keys' heads on one shard, by (subscription, key), in
/// the order they came.
#[derive(Default)]
pub(crate) struct Waiting {
    queues: HashMap<(u64, u64), VecDeque<Retry>>,
}

impl Waiting {
    /// How many wait behind key `key` of subscription `sub`.
    pub(crate) fn len_of(&self, sub: u64, key: u64) -> usize {
        self.queues.get(&(sub, key)).map_or(0, VecDeque::len)
    }

    /// How many wait, behind all keys.
    pub(crate) fn len(&self) -> usize {
        self.queues.values().map(VecDeque::len).sum()
    }

    /// Takes them all (shutdown, once the worker has stopped).
    pub(crate) fn take(&mut self) -> Vec<Retry> {
        self.queues.drain().flat_map(|(_, q)| q).collect()
    }
}

impl Worker<'_> {
    /// Whether a delivery of `envelope` to `meta`'s ordered subscription must wait behind its
    /// key's head: one comparison while no key is in progress.
    #[inline]
    pub(super) fn must_wait(&self, meta: &SubMeta, envelope: &Envelope) -> bool {
        meta.ordered && !self.keys.is_empty() && self.must_wait_slow(meta, envelope)
    }

    #[cold]
    #[inline(never)]
    fn must_wait_slow(&self, meta: &SubMeta, envelope: &Envelope) -> bool {
        envelope.key().is_some_and(|key| {
            self.keys
                .get(&(meta.id, key.get()))
                .is_some_and(|head| *head != envelope.id())
        })
    }

    /// The delivery of `envelope` to `meta`'s ordered subscription did not settle as it ran
    /// (a retry waits, or a deferral): its key stays in progress with it at the head.
    #[inline]
    pub(super) fn key_in_progress(&mut self, meta: &SubMeta, envelope: &Envelope) {
        if meta.ordered
            && let Some(key) = envelope.key()
        {
            self.keys
                .entry((meta.id, key.get()))
                .or_insert_with(|| envelope.id());
        }
    }

    /// The delivery of `envelope` to `meta`'s ordered subscription settled: if it was its
    /// key's head, the next waiting delivery becomes the head and runs before the worker's
    /// next message.
    #[inline]
    pub(super) fn key_settled(&mut self, meta: &SubMeta, envelope: &Envelope) {
        if meta.ordered
            && !self.keys.is_empty()
            && let Some(key) = envelope.key()
        {
            self.key_done(meta.id, key.get(), Some(envelope.id()));
        }
    }

    /// Moves key `key` of subscription `sub` on (if `head` is its head, or in any case when
    /// `None`).
    #[cold]
    #[inline(never)]
    pub(super) fn key_done(&mut self, sub: u64, key: u64, head: Option<EventId>) {
        let Some(current) = self.keys.get_mut(&(sub, key)) else {
            return;
        };
        if head.is_some_and(|head| head != *current) {
            return;
        }
        let next = {
            let mut waiting = self.shared.waiting.lock();
            let queue = waiting.queues.get_mut(&(sub, key));
            let next = queue.and_then(VecDeque::pop_front);
            if waiting
                .queues
                .get(&(sub, key))
                .is_some_and(VecDeque::is_empty)
            {
                waiting.queues.remove(&(sub, key));
            }
            next
        };
        let Some(next) = next else {
            self.keys.remove(&(sub, key));
            return;
        };
        *current = next.event.envelope.id();
        unparked(self.core, (next.ops.meta)(&next.sub));
        self.shared.hand_over(Routed {
            shard: self.index,
            work: Work::Retry(next),
        });
    }

    /// A delivery to `sub` whose key's head is in progress: waits behind it, at the same
    /// attempt (or, a publish admitted into a `Shed` lane past the park capacity, is shed).
    #[cold]
    #[inline(never)]
    pub(super) fn wait_behind_head<E: Event>(
        &mut self,
        sub: &Arc<Sub<E>>,
        attempt: u32,
        first: bool,
    ) -> Flow {
        if self.probing == Some(sub.meta.id) {
            // A half-open breaker's probe that cannot run yet: the next delivery probes.
            self.probing = None;
            if let Some(breaker) = &sub.meta.breaker {
                breaker.give_back_probe();
                self.core.release_parked(sub.meta.lane);
            }
        }
        let shed = self.admitted && first && sub.meta.park_full();
        self.pending.push(Failed {
            sub: sub.clone(),
            attempt,
            error: String::new(),
            then: if shed { Then::Shed } else { Then::Wait },
        });
        self.shared
            .held_retries
            .store(self.pending.len() as u64, Ordering::Relaxed);
        Flow::Continue
    }

    /// Puts `retry` (not run, at the attempt it is due) behind its key's head.
    pub(super) fn wait_for_key(&mut self, retry: Retry) {
        let meta = (retry.ops.meta)(&retry.sub);
        let Some(key) = retry.event.envelope.key() else {
            unreachable!("only keyed deliveries wait for their key")
        };
        parked(self.core, meta);
        let id = retry.subscription();
        self.keys
            .entry((id, key.get()))
            .or_insert_with(|| retry.event.envelope.id());
        self.shared
            .waiting
            .lock()
            .queues
            .entry((id, key.get()))
            .or_default()
            .push_back(retry);
        self.shared.hand_off(1);
    }

    /// Heads settled on other threads (deferrals completed): their keys move on.
    pub(super) fn take_key_releases(&mut self) {
        let released = std::mem::take(&mut *self.shared.key_releases.lock());
        for (sub, key, head) in released {
            self.key_done(sub, key, Some(head));
        }
    }
}

impl Core {
    /// The keys that dead letters in the ring hold now, with how many deliveries wait behind
    /// each.
    pub(crate) fn held_keys(&self) -> Vec<HeldKey> {
        let mut letters = Vec::new();
        self.dead_letters
            .each(&crate::dead_letter::DeadLetterFilter::new(), |letter| {
                if let Some(key) = letter.envelope().key() {
                    letters.push((letter.id(), letter.subscription, letter.reason(), key, {
                        letter.envelope().id()
                    }));
                }
            });
        letters
            .into_iter()
            .filter_map(|(id, sub, reason, key, event_id)| {
                let meta = self.registry.lookup(sub)?;
                holds_key(&meta, reason).then(|| {
                    let lane = &self.lanes[meta.lane as usize];
                    let shard = lane.start + key.shard(lane.workers);
                    HeldKey {
                        dead_letter: id,
                        event_id,
                        subscription: sub,
                        service: meta.service.as_str().to_owned(),
                        handler: meta.name.to_string(),
                        key: key.get(),
                        waiting: self.shards[shard]
                            .worker
                            .waiting
                            .lock()
                            .len_of(sub, key.get()),
                    }
                })
            })
            .collect()
    }

    /// Dead letters that left the ring without being redriven — skipped, purged, or
    /// `evicted` to make room — no longer hold their keys: the later deliveries run. An
    /// evicted one that held its key is counted.
    pub(crate) fn letters_gone(&self, letters: &[DeadLetter], evicted: bool) {
        for letter in letters {
            let Some(meta) = self.registry.lookup(letter.subscription) else {
                continue;
            };
            if !holds_key(&meta, letter.reason()) || letter.envelope().key().is_none() {
                continue;
            }
            if evicted {
                self.held_evicted.fetch_add(1, Ordering::Relaxed);
            }
            let shard = self.lanes[meta.lane as usize].shard_for(letter.envelope());
            self.key_settled_elsewhere(shard, &meta, letter.envelope());
        }
    }

    /// The head of a key of `meta`'s ordered subscription settled on another thread than
    /// its worker (shard `shard`'s): the worker moves the key on before its next message.
    pub(crate) fn key_settled_elsewhere(&self, shard: usize, meta: &SubMeta, envelope: &Envelope) {
        if !meta.ordered {
            return;
        }
        let Some(key) = envelope.key() else {
            return;
        };
        let worker = &self.shards[shard].worker;
        worker
            .key_releases
            .lock()
            .push((meta.id, key.get(), envelope.id()));
        worker.release.store(true, Ordering::SeqCst);
        let _ = self.shards[shard].tx.try_send(Msg::Wake);
    }
}

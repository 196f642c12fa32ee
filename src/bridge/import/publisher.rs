//! The publishing thread of an import: decodes each read's entries, drops duplicates,
//! dead-letters what cannot be published and publishes the rest as a batch.

use super::*;

/// The publishing half of an import: decodes what the reader hands over, drops duplicates,
/// dead-letters what cannot be published, and publishes the rest; on its own thread, so that
/// decoding overlaps the next read's round trip.
pub(super) struct Publisher {
    pub(super) bus: Bus,
    pub(super) options: ImportOptions,
    pub(super) counters: Arc<Counters>,
    pub(super) recent: Recent,
    pub(super) settle: crossbeam_channel::Sender<Settle>,
    /// The bridge's stop flag: a publish held back by a full park gives up when it is set.
    pub(super) stop: Arc<AtomicBool>,
}

/// What becomes of one entry.
enum Taken<E> {
    /// To publish (with its envelope), and acknowledge when its deliveries settle.
    Publish(E, Envelope),
    /// Acknowledge now: a duplicate.
    Ack,
    /// Dead-lettered (the reason, and why).
    Buried(&'static str, String),
}

impl Publisher {
    /// Takes the pages the reader hands over until it stops; once the bus refuses a publish
    /// (it is shutting down), leaves every entry pending.
    pub(super) fn run<E: Event>(mut self, pages: crossbeam_channel::Receiver<Page>) {
        let mut refused = false;
        for page in pages {
            let mut ready = Vec::with_capacity(page.len());
            for (entry, deliveries, seen) in page {
                if refused {
                    let _ = self.settle.send(Settle::Leave(entry.id));
                    continue;
                }
                match self.take::<E>(&entry, deliveries, seen) {
                    Taken::Publish(event, envelope) => ready.push((entry.id, event, envelope)),
                    Taken::Ack => {
                        let _ = self.settle.send(Settle::Ack(entry.id, None));
                    }
                    Taken::Buried(reason, why) => {
                        let _ = self.settle.send(Settle::Buried(entry, reason, why));
                    }
                }
            }
            refused = refused || !self.publish(ready);
        }
    }

    /// Publishes the entries of one read, in order, as batches (a batch per run of entries
    /// from one source service), each with a tracker that tells the reader to acknowledge it
    /// once every delivery of it settled (or to leave it pending: one never ran, at shutdown's
    /// deadline). `false` when the bus is shutting down: what was not accepted is left pending
    /// for another consumer.
    fn publish<E: Event>(&mut self, ready: Vec<(String, E, Envelope)>) -> bool {
        let core = self.bus.core();
        let mut ready = ready.into_iter().peekable();
        while let Some(first) = ready.next() {
            let source = first.2.source_id();
            let mut run = vec![first];
            while let Some(next) = ready.next_if(|(_, _, e)| e.source_id() == source) {
                run.push(next);
            }
            let mut trackers = Vec::with_capacity(run.len());
            let items: Vec<(E, Stamp, Option<std::time::Duration>)> = run
                .into_iter()
                .map(|(id, event, envelope)| {
                    let tracking = crate::track::Tracking::new();
                    let seen = self.options.seen_ttl.map(|_| envelope.id());
                    trackers.push((id, seen, Tracker(tracking.clone())));
                    let mut stamp = Stamp::Given(envelope);
                    stamp.track(tracking);
                    (event, stamp, None)
                })
                .collect();
            let stop = &self.stop;
            let stopping = || stop.load(Ordering::SeqCst);
            if core
                .publish_batch_or_give_up(source, items, &stopping)
                .is_err()
            {
                for (id, _, _) in trackers {
                    let _ = self.settle.send(Settle::Leave(id));
                }
                for (id, _, _) in ready {
                    let _ = self.settle.send(Settle::Leave(id));
                }
                return false;
            }
            self.counters
                .imported
                .fetch_add(trackers.len() as u64, Ordering::Relaxed);
            for (id, seen, tracker) in trackers {
                let settle = self.settle.clone();
                tracker.on_complete(move |c| {
                    let _ = settle.send(if c.left == 0 && c.abandoned == 0 {
                        Settle::Ack(id, seen)
                    } else {
                        Settle::Leave(id)
                    });
                });
            }
        }
        true
    }

    /// Decodes one entry and decides what becomes of it.
    fn take<E: Event>(&mut self, entry: &Entry, deliveries: u64, seen: bool) -> Taken<E> {
        let bytes = entry.m.as_slice();
        let core = self.bus.core();
        let wire = match decode::<E>(core, bytes) {
            Ok(wire) => wire,
            Err((envelope, why)) => {
                // Kept with its raw text and acknowledged: it would never decode.
                self.counters
                    .decode_failures
                    .fetch_add(1, Ordering::Relaxed);
                core.bury_unpublished(
                    E::NAME,
                    E::VERSION,
                    envelope,
                    bytes,
                    IMPORT,
                    why.clone(),
                    true,
                    None,
                );
                return Taken::Buried("undecodable", why);
            }
        };
        if deliveries > u64::from(self.options.max_deliveries) {
            let why = format!(
                "delivered {deliveries} times, more than the {} allowed",
                self.options.max_deliveries
            );
            core.bury_unpublished(
                E::NAME,
                E::VERSION,
                Some(wire.envelope),
                bytes,
                IMPORT,
                why.clone(),
                false,
                Some(republish::<E>),
            );
            return Taken::Buried("retries_exhausted", why);
        }
        if seen
            || !self
                .recent
                .insert(wire.envelope.id(), self.options.dedup_window)
        {
            self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
            return Taken::Ack;
        }
        Taken::Publish(wire.payload, wire.envelope)
    }
}

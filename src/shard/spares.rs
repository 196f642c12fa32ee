//! Emptied batch buffers, handed back from a shard's worker to its publishers.
//!
//! A batch message carries its events in a vector the publisher allocated. Freed by the worker,
//! it would go back to the allocator from another thread than the one that took it, and
//! with the system allocator the two threads then take turns on one arena's lock, once per
//! message (measured: a futex call for every three or four messages, the publisher waking the
//! worker's frees). So the worker empties the vector and offers it back; the next publisher
//! to fill a group for the shard takes it. A handful are kept per shard; the rest are freed.

use super::*;

/// How many emptied buffers a shard keeps.
const SPARES: usize = 4;

/// A shard's emptied batch buffers (`Vec<(Envelope, E)>` of any event type `E`, length 0).
pub(crate) struct Spares {
    tx: Sender<Payload>,
    rx: Receiver<Payload>,
}

impl Spares {
    pub(crate) fn new() -> Spares {
        let (tx, rx) = crossbeam_channel::bounded(SPARES);
        Spares { tx, rx }
    }

    /// An empty buffer for a group of up to [`MAX_GROUP`] events of type `E`: a spare one if
    /// the shard has one of this type, else a new one.
    #[inline]
    pub(crate) fn take<E: Event>(&self) -> Vec<(Envelope, E)> {
        if let Ok(spare) = self.rx.try_recv()
            && let Ok(items) = spare.downcast::<Vec<(Envelope, E)>>()
        {
            let items = items.into_inner();
            debug_assert!(
                items.is_empty(),
                "spares are emptied before they are offered"
            );
            if items.capacity() >= MAX_GROUP {
                return items;
            }
        }
        // A spare of another type is freed here, on a publishing thread.
        Vec::with_capacity(MAX_GROUP)
    }

    /// Offers an emptied buffer back; freed when the shard keeps enough.
    #[inline]
    pub(crate) fn give<E: Event>(&self, items: Vec<(Envelope, E)>) {
        debug_assert!(items.is_empty(), "only emptied buffers are offered");
        if items.capacity() >= MAX_GROUP {
            let _ = self.tx.try_send(smallbox!(items));
        }
    }
}

/// Drops what is left of `items` under the guard, front to back (events' and envelopes'
/// `Drop` may be user code: each panic is caught and counted on its own, so that two in one
/// message cannot abort the process), and offers the emptied buffer back to the worker's shard.
pub(super) fn recycle<E: Event>(worker: &mut Worker<'_>, items: Vec<(Envelope, E)>) {
    // A `VecDeque` made from a `Vec`, and back when empty, keeps its buffer without copying.
    let mut left = VecDeque::from(items);
    while !left.is_empty() {
        Runner::run(worker, Seam::Drop, &mut || {
            while let Some(item) = left.pop_front() {
                drop(item);
            }
        });
    }
    if !worker.detached {
        worker.core.shards[worker.index]
            .spares
            .give(Vec::from(left));
    }
}

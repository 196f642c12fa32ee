//! Publishing from rayon's parallel iterators (cargo feature `rayon`).
//!
//! Ground rules: each rayon task gathers the events it is given into chunks of
//! [`MAX_GROUP`] × shards and publishes each chunk with [`Bus::publish_batch_with`], so a
//! chunk costs about one channel operation per shard instead of one per event. Events not
//! accepted come back from every task, merged into one error.
//!
//! A publish on a rayon worker thread never blocks on a full shard (see the crate docs): the
//! batch path it uses applies the same rule.

use rayon::iter::{IntoParallelIterator, ParallelIterator};

use crate::bus::Bus;
use crate::error::PublishBatchError;
use crate::event::{Event, Publish};
use crate::shard::MAX_GROUP;

impl Bus {
    /// Publishes the events of a parallel iterator, grouped per shard on each rayon task as
    /// [`publish_batch`](Self::publish_batch) groups them.
    ///
    /// Events of one task that share a key keep their order; events handled by different
    /// tasks have none between them (that is what a parallel iterator means). Returns once
    /// every event was accepted or handed back.
    ///
    /// # Errors
    ///
    /// [`PublishBatchError`] with every event that was not accepted: the bus is shutting down,
    /// or a shard stayed full with its worker stuck and its overflow full (see the crate
    /// docs on rayon).
    ///
    /// # Examples
    ///
    /// ```
    /// use microbus::{Bus, Context, Event, HandlerResult};
    /// use rayon::prelude::*;
    /// use serde::{Deserialize, Serialize};
    /// use std::sync::atomic::{AtomicU64, Ordering};
    /// use std::sync::Arc;
    ///
    /// #[derive(Debug, Serialize, Deserialize)]
    /// struct Scored { order_id: u64, score: u32 }
    /// impl Event for Scored { const NAME: &'static str = "Scored"; }
    ///
    /// let bus = Bus::builder().workers(2).build()?;
    /// let total = Arc::new(AtomicU64::new(0));
    /// let sum = total.clone();
    /// bus.subscribe(move |e: &Scored, _: &Context| -> HandlerResult {
    ///     sum.fetch_add(u64::from(e.score), Ordering::Relaxed);
    ///     Ok(())
    /// })?;
    /// bus.publish_par_iter((0..10_000u64).into_par_iter().map(|order_id| Scored {
    ///     order_id,
    ///     score: (order_id % 10) as u32,
    /// }))?;
    /// bus.flush(std::time::Duration::from_secs(5))?;
    /// assert_eq!(total.load(Ordering::Relaxed), 45_000);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn publish_par_iter<E, I>(&self, events: I) -> Result<(), PublishBatchError<E>>
    where
        E: Event,
        I: IntoParallelIterator<Item = E>,
    {
        self.publish_par_iter_with(events.into_par_iter().map(|event| (event, Publish::new())))
    }

    /// Like [`publish_par_iter`](Self::publish_par_iter), each event with its own options (a
    /// key, headers, a correlation).
    ///
    /// # Errors
    ///
    /// As [`publish_par_iter`](Self::publish_par_iter).
    pub fn publish_par_iter_with<E, I>(&self, items: I) -> Result<(), PublishBatchError<E>>
    where
        E: Event,
        I: IntoParallelIterator<Item = (E, Publish)>,
    {
        let chunk = MAX_GROUP * self.core().shards.len();
        let publish = |chunk: &mut Vec<(E, Publish)>, back: &mut Option<PublishBatchError<E>>| {
            if let Err(err) = self.publish_batch_with(chunk.drain(..)) {
                match back {
                    Some(back) => back.merge(err),
                    None => *back = Some(err),
                }
            }
        };
        let back = items
            .into_par_iter()
            .fold(
                || (Vec::new(), None),
                |(mut pending, mut back), item| {
                    if pending.capacity() == 0 {
                        pending.reserve_exact(chunk);
                    }
                    pending.push(item);
                    if pending.len() == chunk {
                        publish(&mut pending, &mut back);
                    }
                    (pending, back)
                },
            )
            .map(|(mut pending, mut back)| {
                if !pending.is_empty() {
                    publish(&mut pending, &mut back);
                }
                back
            })
            .reduce(
                || None,
                |a, b| match (a, b) {
                    (Some(mut a), Some(b)) => {
                        a.merge(b);
                        Some(a)
                    }
                    (a, b) => a.or(b),
                },
            );
        match back {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }
}

//! Batch subscriptions: [`Bus::subscribe_batch`].

use super::*;
use crate::context::Batch;

impl Bus {
    /// Subscribes a batch handler to events of type `E`: it receives a [`Batch`] of events,
    /// each with its envelope, and settles them all with one result.
    ///
    /// A batch is what one channel message carried — up to 64 events of a
    /// [`publish_batch`](Self::publish_batch) (or of a handler's), in publish order — or one
    /// event published on its own; a batch never waits to fill. On `Ok`, every event of the
    /// batch succeeded. On an error (or a panic), the batch spends no attempt: its events run
    /// again at once, one by one (batches of one), in order, as first attempts, and from there
    /// each follows the subscription's retry policy on its own, so that a poison event is
    /// dead-lettered alone and the others succeed. A failed batch counts one failure towards a
    /// circuit breaker. A batch runs only while nothing holds the subscription back: paused,
    /// or behind an open breaker, its events park one by one like any delivery.
    ///
    /// The [`Context`] of a batch is its first event's: what the handler publishes defaults
    /// to that event's correlation and names it as the cause; publish with
    /// [`Publish::caused_by`] to name another event of the batch. Per-event counters stay
    /// exact (each event is a delivery); latencies time each call, batch or not.
    ///
    /// # Errors
    ///
    /// As [`subscribe`](Self::subscribe); [`SubscribeError::Invalid`] for an
    /// [`ordered`](SubscribeOptions::ordered) batch subscription.
    ///
    /// # Examples
    ///
    /// ```
    /// use microbus::{Batch, Bus, Context, Event, HandlerResult};
    /// use serde::{Deserialize, Serialize};
    /// use std::sync::atomic::{AtomicU64, Ordering};
    /// use std::sync::{Arc, Mutex};
    /// use std::time::Duration;
    ///
    /// #[derive(Serialize, Deserialize)]
    /// struct Reading { sensor: u64, value: u64 }
    /// impl Event for Reading { const NAME: &'static str = "Reading"; }
    ///
    /// let bus = Bus::builder().workers(1).build()?;
    /// let sizes = Arc::new(Mutex::new(Vec::new()));
    /// let total = Arc::new(AtomicU64::new(0));
    /// let (seen, sum) = (sizes.clone(), total.clone());
    /// bus.subscribe_batch(move |batch: &Batch<Reading>, _: &Context| -> HandlerResult {
    ///     seen.lock().unwrap().push(batch.len());
    ///     sum.fetch_add(batch.events().map(|r| r.value).sum::<u64>(), Ordering::SeqCst);
    ///     Ok(())
    /// })?;
    /// bus.publish_batch((0..100).map(|value| Reading { sensor: 1, value }))?;
    /// bus.flush(Duration::from_secs(5))?;
    /// assert_eq!(total.load(Ordering::SeqCst), 4950);
    /// assert_eq!(*sizes.lock().unwrap(), [64, 36]); // one call per message
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn subscribe_batch<E, F>(&self, handler: F) -> Result<Subscription, SubscribeError>
    where
        E: Event,
        F: Fn(&Batch<'_, E>, &Context<'_>) -> HandlerResult + Send + Sync + 'static,
    {
        self.subscribe_batch_with(SubscribeOptions::new(), handler)
    }

    /// Subscribes a batch handler with options (see [`subscribe_batch`](Self::subscribe_batch)).
    ///
    /// # Errors
    ///
    /// As [`subscribe_batch`](Self::subscribe_batch).
    pub fn subscribe_batch_with<E, F>(
        &self,
        options: SubscribeOptions,
        handler: F,
    ) -> Result<Subscription, SubscribeError>
    where
        E: Event,
        F: Fn(&Batch<'_, E>, &Context<'_>) -> HandlerResult + Send + Sync + 'static,
    {
        let batch: Arc<BatchFn<E>> = Arc::new(handler);
        let one = batch.clone();
        let single: HandlerFn<E> = Box::new(move |event: &E, ctx: &Context<'_>| {
            one(&Batch::one(ctx.envelope(), event), ctx)
        });
        self.subscribe_boxed(options, std::any::type_name::<F>(), single, Some(batch))
    }
}

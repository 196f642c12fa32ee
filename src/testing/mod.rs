//! Helpers for testing an application's services (the `testing` cargo feature): a
//! [`ManualClock`] a test moves by hand, a [`TestContext`] to call a handler without a bus,
//! and a [`Recorder`] of every event of a type that flows through a bus.
//!
//! Ground rules: a manual clock is the clock the bus reads (see `clock`), and a test context
//! owns a small bus of its own; a recorder touches nothing on the delivery path: it is a tap
//! that keeps the events of its type (as JSON, decoded when asked for, so that an event need not be `Clone`);
//! it holds its records weakly from the bus's side, so dropping the recorder stops the
//! recording.

use std::marker::PhantomData;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::bus::Bus;
use crate::event::{Envelope, Event};

mod context;

pub use self::context::{Deferral, TestContext, TestContextBuilder};
pub use crate::clock::{AdvanceError, ManualClock};

/// Every event of type `E` published on a bus since [`Bus::record`] made it — by any service,
/// handlers included, whether anything subscribed to it or not — with its envelope, in the
/// order the bus saw them: an accepted event when the worker that takes it starts on it (so
/// each publishing thread's events of one key in publish order), an event nobody subscribed
/// to when it is published (a delayed one when it falls due; a handler's when the handler
/// succeeds).
///
/// # Examples
///
/// ```
/// use microbus::{Bus, Context, Event, HandlerResult};
/// use serde::{Deserialize, Serialize};
/// use std::time::Duration;
///
/// #[derive(Debug, PartialEq, Serialize, Deserialize)]
/// struct OrderCancelled { order: u64 }
/// impl Event for OrderCancelled { const NAME: &'static str = "OrderCancelled"; }
/// #[derive(Debug, PartialEq, Serialize, Deserialize)]
/// struct OrderShipped { order: u64 }
/// impl Event for OrderShipped { const NAME: &'static str = "OrderShipped"; }
///
/// let bus = Bus::builder().build()?;
/// let shipped = bus.record::<OrderShipped>();
/// let cancelled = bus.record::<OrderCancelled>();
/// bus.subscribe(|_: &OrderCancelled, _: &Context| -> HandlerResult { Ok(()) })?;
/// bus.publish(OrderCancelled { order: 7 })?;
/// bus.flush(Duration::from_secs(5))?;
/// assert_eq!(cancelled.events(), [OrderCancelled { order: 7 }]);
/// shipped.assert_none(); // a cancelled order ships nothing
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Recorder<E: Event> {
    records: Arc<Records>,
    _event: PhantomData<fn() -> E>,
}

#[derive(Default)]
struct Records {
    seen: Mutex<Vec<(Envelope, String)>>,
    grew: Condvar,
}

impl Bus {
    /// Starts recording every event of type `E` that flows through the bus (see
    /// [`Recorder`]). Recording stops when the recorder is dropped.
    pub fn record<E: Event>(&self) -> Recorder<E> {
        let records = Arc::new(Records::default());
        let weak: Weak<Records> = Arc::downgrade(&records);
        self.tap(move |tapped| {
            if tapped.event_name() != E::NAME || tapped.event_version() != E::VERSION {
                return;
            }
            let Some(records) = weak.upgrade() else {
                return;
            };
            let json = tapped.payload_json();
            records.seen.lock().push((tapped.envelope().clone(), json));
            records.grew.notify_all();
        });
        Recorder {
            records,
            _event: PhantomData,
        }
    }
}

impl<E: Event> Recorder<E> {
    /// The events recorded so far, in order.
    pub fn events(&self) -> Vec<E> {
        self.recorded()
            .into_iter()
            .map(|(event, _)| event)
            .collect()
    }

    /// The events recorded so far with their envelopes, in order.
    ///
    /// # Panics
    ///
    /// If an event does not decode from the JSON it was recorded as (its `Serialize` and
    /// `Deserialize` disagree).
    pub fn recorded(&self) -> Vec<(E, Envelope)> {
        self.records
            .seen
            .lock()
            .iter()
            .map(|(envelope, json)| {
                let event = serde_json::from_str(json).unwrap_or_else(|e| {
                    panic!("a recorded {} does not decode: {e}: {json}", E::NAME)
                });
                (event, envelope.clone())
            })
            .collect()
    }

    /// The envelopes of the events recorded so far, in order.
    pub fn envelopes(&self) -> Vec<Envelope> {
        self.records
            .seen
            .lock()
            .iter()
            .map(|(envelope, _)| envelope.clone())
            .collect()
    }

    /// How many events were recorded.
    pub fn len(&self) -> usize {
        self.records.seen.lock().len()
    }

    /// Whether none was.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until at least `n` events are recorded, or `timeout` (real time) passes; whether
    /// they were. Any `Duration` is accepted.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        let mut seen = self.records.seen.lock();
        while seen.len() < n {
            match deadline {
                Some(deadline) => {
                    if self
                        .records
                        .grew
                        .wait_until(&mut seen, deadline)
                        .timed_out()
                    {
                        return seen.len() >= n;
                    }
                }
                None => self.records.grew.wait(&mut seen),
            }
        }
        true
    }

    /// Asserts that no event of type `E` was recorded — after a
    /// [`flush`](crate::Bus::flush), that none was published.
    ///
    /// # Panics
    ///
    /// When one was, naming how many and the first one's id.
    #[track_caller]
    pub fn assert_none(&self) {
        let seen = self.records.seen.lock();
        if let Some((envelope, json)) = seen.first() {
            panic!(
                "expected no {} but {} were published, the first {} ({json})",
                E::NAME,
                seen.len(),
                envelope.id()
            );
        }
    }
}

impl<E: Event> std::fmt::Debug for Recorder<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("event", &E::NAME)
            .field("recorded", &self.len())
            .finish()
    }
}

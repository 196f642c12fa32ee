//! Events that no subscription matched: counted as unmatched and shown to the taps, now or,
//! delayed, when they fall due; and the taps themselves.

use super::*;

impl Core {
    /// Counts an event that matched no subscription, and shows it to the taps (it never
    /// reaches a worker). A tracked event's tracker completes with no delivery.
    pub(super) fn count_unmatched<E: Event>(&self, event: &E, envelope: Envelope) {
        self.unmatched.fetch_add(1, Ordering::Relaxed);
        if let Some(done) = envelope.tracker().and_then(|t| t.arm(envelope.id(), 0)) {
            done.run(&mut &self.panics);
        }
        if self.taps.on() {
            self.show_taps(&envelope, event, &mut &self.panics);
        }
        if envelope.has_extra() {
            // A tracker's callback is user code, and so is its `Drop`.
            self.panics.drop(envelope);
        }
    }

    /// Shows an event to the taps, each under `runner`'s guard (the event's `Serialize`, when
    /// a tap asks for the payload, under the guard too).
    #[cold]
    pub(crate) fn show_taps<E: Event>(
        &self,
        envelope: &Envelope,
        event: &E,
        runner: &mut dyn Runner,
    ) {
        let payload = || crate::shard::to_json(event, &mut &self.panics);
        self.taps.call(
            &Tapped {
                event: E::NAME,
                version: E::VERSION,
                envelope,
                payload: &payload,
            },
            runner,
        );
    }

    /// An event that matched no subscription: counted, or refused once the bus is closing.
    #[cold]
    #[inline(never)]
    pub(super) fn publish_unmatched<E: Event>(
        &self,
        source: NameId,
        event: E,
        envelope: Envelope,
    ) -> Result<EventId, (Refusal, E)> {
        if self.is_closing() {
            self.registry.uncount(TypeId::of::<E>(), source, 1, true);
            return Err((Refusal::Shutdown, event));
        }
        let id = envelope.id();
        self.count_unmatched(&event, envelope);
        Ok(id)
    }

    /// A delayed publish of an event that no subscription matched: its tracker completes now
    /// (nothing is to be delivered); it is counted as unmatched and shown to the taps when it
    /// falls due, by the worker it falls due on.
    #[cold]
    pub(super) fn publish_unmatched_later<E: Event>(
        &self,
        source: NameId,
        event: E,
        mut envelope: Envelope,
        delay: Duration,
    ) -> Result<EventId, (Refusal, E)> {
        let refuse = |event: E| {
            self.registry.uncount(TypeId::of::<E>(), source, 1, true);
            Err((Refusal::Shutdown, event))
        };
        if self.is_closing() {
            return refuse(event);
        }
        let id = envelope.id();
        if let Some(tracker) = envelope.take_tracker()
            && let Some(done) = tracker.arm(id, 0)
        {
            done.run(&mut &self.panics);
        }
        let shard = self.lanes[0].shard_for(&envelope);
        let routed = Routed {
            shard,
            work: Work::Task(Task::new(envelope, 0, 0, event)),
        };
        match self.timer.schedule(routed, delay) {
            Ok(()) => Ok(id),
            Err(routed) => {
                let Work::Task(task) = routed.work else {
                    unreachable!("scheduled as a task")
                };
                refuse(task.into_event())
            }
        }
    }
}

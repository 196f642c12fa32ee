//! The dead-letter operations that need the engine: redrive a letter, rebuild one read from a
//! file, and bury what an import could not publish.

use super::*;

impl Core {
    /// Sends a dead letter back to its subscription as a new delivery; gives it back with the
    /// reason when it cannot go.
    #[allow(clippy::result_large_err)] // The error hands the dead letter back.
    pub(crate) fn redrive(&self, letter: DeadLetter) -> Result<(), (DeadLetter, RedriveError)> {
        let id = letter.id();
        // First: a stopped bus has let go of every letter's way back.
        if self.is_closing() {
            return Err((letter, RedriveError::Shutdown(id)));
        }
        let Some(retry) = letter
            .redrive
            .as_ref()
            .and_then(|r| r.downcast_ref::<Retry>())
        else {
            return match letter.republish {
                Some(republish) => {
                    republish(self as &dyn std::any::Any, &letter).map_err(|e| (letter, e))
                }
                None => Err((letter, RedriveError::NotRedrivable(id))),
            };
        };
        let meta = self.registry.lookup(retry.subscription());
        let Some(meta) = meta.filter(|meta| meta.active.load(Ordering::SeqCst)) else {
            return Err((letter, RedriveError::SubscriptionGone(id)));
        };
        let index = self.lanes[meta.lane as usize].shard_for(&retry.event.envelope);
        // Counted in before it can be settled; given back if the timer has stopped.
        let counted = Counted::redrive(retry.event.envelope.source_id());
        if !self.admit(index, 1) {
            return Err((letter, RedriveError::Shutdown(id)));
        }
        let routed = Routed {
            shard: index,
            work: Work::Retry(retry.clone()),
        };
        match self.timer.reoffer(routed) {
            Ok(()) => Ok(()),
            Err(_) => {
                self.refund(index, 1, counted);
                Err((letter, RedriveError::Shutdown(id)))
            }
        }
    }

    /// Rebuilds a dead letter read from a file, matching it to today's event types and
    /// subscriptions.
    pub(crate) fn rebuild(&self, line: crate::dead_letter::Line) -> DeadLetter {
        let envelope = line.envelope.clone();
        let event_name = NameId::intern(&line.event).as_str();
        let service = NameId::intern(&line.service).as_str();
        let payload = line.payload.get().to_owned();
        let snapshot = self.registry.load_full();
        let decode = |decode: &dyn Fn() -> Result<Retry, String>| {
            // The event's `Deserialize`, or an upcaster: user code.
            self.panics
                .run(crate::guard::Seam::Serde, decode)
                .unwrap_or_else(|| Err("decoding the payload panicked".to_owned()))
        };
        let redrive = match (
            self.rebuilders.decoder(&line.event, line.version),
            self.rebuilders.upcast_rebuild(&line.event, line.version),
        ) {
            (Some(decoder), _) => decode(&|| {
                decoder(
                    &snapshot,
                    envelope.clone(),
                    &payload,
                    &line.handler,
                    service,
                )
            }),
            (None, Some(upcast)) => decode(&|| {
                upcast(
                    &snapshot,
                    envelope.clone(),
                    &payload,
                    &line.handler,
                    service,
                )
            }),
            (None, None) => Err(format!(
                "no event type {} v{} is subscribed on this bus",
                line.event, line.version
            )),
        };
        let at = |nanos: u64| SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos);
        let (subscription, redrive, blocked) = match redrive {
            Ok(retry) => (retry.subscription(), Some(retry), None),
            Err(why) => (0, None, Some(why)),
        };
        DeadLetter {
            id: self.dead_letters.next_id(),
            envelope,
            event_name,
            event_version: line.version,
            payload,
            subscription,
            handler: line.handler,
            service,
            errors: line.errors,
            attempts: line.attempts,
            first_failure: at(line.first_failure_unix_nanos),
            last_failure: at(line.last_failure_unix_nanos),
            reason: line.reason,
            republish: redrive
                .is_none()
                .then(|| {
                    self.republishers
                        .lock()
                        .get(&(event_name, line.version))
                        .copied()
                })
                .flatten(),
            redrive: redrive.map(|retry| Arc::new(retry) as crate::dead_letter::Redrive),
            blocked,
        }
    }

    /// Keeps a message from outside the process that is not published as a dead letter: its
    /// raw text (as a JSON string), the envelope if that much decoded, and why —
    /// [`DeadLetterReason::Undecodable`] when it did not decode, else
    /// [`DeadLetterReason::RetriesExhausted`] (delivered too often). It is not a delivery (no
    /// subscription ran it), so the statistics do not count it. With `republish`, a redrive
    /// publishes it into the bus (when it decodes then).
    #[cfg(feature = "redis")]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn bury_unpublished(
        &self,
        event: &str,
        version: u32,
        envelope: Option<Envelope>,
        raw: &[u8],
        handler: &str,
        why: String,
        undecodable: bool,
        republish: Option<crate::dead_letter::Republish>,
    ) {
        if !self.dead_letters.enabled() {
            return;
        }
        let now = self.clock.system_time();
        let envelope = envelope.unwrap_or_else(|| {
            Envelope::stamp_at(
                self.clock.unix_nanos(),
                NameId::intern(handler),
                Default::default(),
            )
        });
        let service = envelope.source();
        let letter = DeadLetter {
            id: self.dead_letters.next_id(),
            envelope,
            event_name: NameId::intern(event).as_str(),
            event_version: version,
            payload: serde_json::to_string(&String::from_utf8_lossy(raw))
                .expect("a string serializes"),
            subscription: 0,
            handler: handler.to_owned(),
            service,
            errors: vec![why.clone()],
            attempts: 0,
            first_failure: now,
            last_failure: now,
            reason: if undecodable {
                DeadLetterReason::Undecodable
            } else {
                DeadLetterReason::RetriesExhausted
            },
            redrive: None,
            blocked: republish.is_none().then_some(why),
            republish,
        };
        let after = self.dead_letters.push(letter);
        self.dead_letters.call_back(after, &mut &self.panics);
    }
}

//! Every public error type. Errors about an event that was not accepted carry the event.

use std::fmt;
use std::time::Duration;

/// An invalid setting: which field, and why.
///
/// # Examples
///
/// ```
/// use microbus::Bus;
///
/// let err = Bus::builder().workers(0).build().unwrap_err();
/// assert_eq!(err.field(), "workers");
/// assert_eq!(err.to_string(), "invalid `workers`: must be at least 1 (got 0)");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    field: &'static str,
    reason: String,
}

impl ConfigError {
    pub(crate) fn new(field: &'static str, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            field,
            reason: reason.into(),
        }
    }

    /// The name of the setting, as the builder method that sets it.
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// Why the value was refused.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid `{}`: {}", self.field, self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// `publish` failed: the bus is shut down, or (on a rayon worker thread only) waiting for room
/// could deadlock. The event comes back.
#[non_exhaustive]
pub enum PublishError<E> {
    /// The bus is shutting down or shut down.
    Shutdown(E),
    /// Published from a rayon worker thread: the event's shard stayed full while its worker
    /// made no progress, and the shard's overflow queue was full too. Waiting could deadlock
    /// (the worker may be waiting for this very pool), so the event comes back instead; see
    /// the crate docs on rayon.
    Full(E),
}

impl<E> PublishError<E> {
    /// The event that was not published.
    pub fn into_event(self) -> E {
        match self {
            Self::Shutdown(e) | Self::Full(e) => e,
        }
    }

    /// Whether the bus was shut down.
    pub fn is_shutdown(&self) -> bool {
        matches!(self, Self::Shutdown(_))
    }

    /// Whether the shard and its overflow were full (a publish from a rayon worker thread).
    pub fn is_full(&self) -> bool {
        matches!(self, Self::Full(_))
    }
}

/// `try_publish` failed: the shard was full, or the bus is shut down. The event comes back.
#[non_exhaustive]
pub enum TryPublishError<E> {
    /// The event's shard was full.
    Full(E),
    /// The bus is shutting down or shut down.
    Shutdown(E),
}

impl<E> TryPublishError<E> {
    /// The event that was not published.
    pub fn into_event(self) -> E {
        match self {
            Self::Full(e) | Self::Shutdown(e) => e,
        }
    }

    /// Whether the shard was full.
    pub fn is_full(&self) -> bool {
        matches!(self, Self::Full(_))
    }

    /// Whether the bus was shut down.
    pub fn is_shutdown(&self) -> bool {
        matches!(self, Self::Shutdown(_))
    }
}

/// `publish_timeout` failed: the shard stayed full, or the bus is shut down. The event comes
/// back.
#[non_exhaustive]
pub enum PublishTimeoutError<E> {
    /// The shard stayed full for the whole timeout.
    Timeout(E),
    /// The bus is shutting down or shut down.
    Shutdown(E),
}

impl<E> PublishTimeoutError<E> {
    /// The event that was not published.
    pub fn into_event(self) -> E {
        match self {
            Self::Timeout(e) | Self::Shutdown(e) => e,
        }
    }

    /// Whether the timeout ran out.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout(_))
    }

    /// Whether the bus was shut down.
    pub fn is_shutdown(&self) -> bool {
        matches!(self, Self::Shutdown(_))
    }
}

/// `publish_batch` failed: the bus is shutting down, or (on a rayon worker thread only) a
/// shard and its overflow were full, as for [`PublishError::Full`]. The events that were not
/// accepted come back; the others were published.
pub struct PublishBatchError<E> {
    events: Vec<E>,
    full: bool,
}

impl<E> PublishBatchError<E> {
    pub(crate) fn new(events: Vec<E>) -> Self {
        PublishBatchError {
            events,
            full: false,
        }
    }

    pub(crate) fn full(events: Vec<E>) -> Self {
        PublishBatchError { events, full: true }
    }

    /// Whether the bus was shut down.
    pub fn is_shutdown(&self) -> bool {
        !self.full
    }

    /// Whether a shard and its overflow were full (a publish from a rayon worker thread).
    pub fn is_full(&self) -> bool {
        self.full
    }

    /// Adds the events of another error: for publishes made in pieces.
    #[cfg(feature = "rayon")]
    pub(crate) fn merge(&mut self, other: PublishBatchError<E>) {
        self.full |= other.full;
        self.events.extend(other.events);
    }

    /// The events that were not published: in publish order among events of the same shard
    /// (the same key), grouped by shard.
    pub fn into_events(self) -> Vec<E> {
        self.events
    }

    /// How many events were not published.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether no event came back (never the case for an error the bus returns).
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

impl<E> fmt::Debug for PublishBatchError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublishBatchError({} events)", self.events.len())
    }
}

impl<E> fmt::Display for PublishBatchError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = if self.full {
            "on a full shard from a rayon worker thread"
        } else {
            "on a bus that is shut down"
        };
        write!(
            f,
            "publishing a batch {why}: {} events came back",
            self.events.len()
        )
    }
}

impl<E> std::error::Error for PublishBatchError<E> {}

impl<E> From<PublishError<E>> for TryPublishError<E> {
    fn from(err: PublishError<E>) -> Self {
        match err {
            PublishError::Shutdown(e) => TryPublishError::Shutdown(e),
            PublishError::Full(e) => TryPublishError::Full(e),
        }
    }
}

impl<E> From<PublishError<E>> for PublishTimeoutError<E> {
    fn from(err: PublishError<E>) -> Self {
        match err {
            PublishError::Shutdown(e) => PublishTimeoutError::Shutdown(e),
            PublishError::Full(e) => PublishTimeoutError::Timeout(e),
        }
    }
}

macro_rules! event_error_fmt {
    ($name:ident { $($variant:ident => $text:literal),* }) => {
        impl<E> fmt::Debug for $name<E> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self {
                    $(Self::$variant(_) => f.write_str(concat!(stringify!($variant), "(..)")),)*
                }
            }
        }

        impl<E> fmt::Display for $name<E> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self {
                    $(Self::$variant(_) => f.write_str($text),)*
                }
            }
        }

        impl<E> std::error::Error for $name<E> {}
    };
}

event_error_fmt!(PublishError {
    Shutdown => "publishing on a bus that is shut down",
    Full => "publishing from a rayon worker thread on a full shard whose worker made no progress"
});
event_error_fmt!(TryPublishError {
    Full => "publishing on a full shard",
    Shutdown => "publishing on a bus that is shut down"
});
event_error_fmt!(PublishTimeoutError {
    Timeout => "publishing timed out on a full shard",
    Shutdown => "publishing on a bus that is shut down"
});

/// `subscribe` failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SubscribeError {
    /// The bus is shutting down or shut down.
    Shutdown,
    /// The source service named in `subscribe_from` is not a valid service name.
    InvalidSource,
    /// The subscription's retry policy is out of bounds (see
    /// [`BusBuilder::retry`](crate::BusBuilder::retry)).
    InvalidRetry,
    /// [`SubscribeOptions::lane`](crate::SubscribeOptions::lane) names a lane the bus was not
    /// built with.
    UnknownLane(&'static str),
    /// An option is out of bounds.
    Invalid {
        /// The option, as the [`SubscribeOptions`](crate::SubscribeOptions) method that sets
        /// it.
        option: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl fmt::Display for SubscribeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Self::UnknownLane(lane) = self {
            return write!(f, "no lane named {lane:?} was declared on this bus");
        }
        if let Self::Invalid { option, reason } = self {
            return write!(f, "invalid subscription option `{option}`: {reason}");
        }
        f.write_str(match self {
            Self::Shutdown => "subscribing on a bus that is shut down",
            Self::InvalidSource => {
                "the source service name is empty, padded, too long or has control characters"
            }
            Self::InvalidRetry => "the retry policy is out of bounds",
            Self::UnknownLane(_) | Self::Invalid { .. } => unreachable!("written above"),
        })
    }
}

impl std::error::Error for SubscribeError {}

/// What was still outstanding when a `flush` gave up.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Pending {
    /// Events waiting in shard channels or spill queues.
    pub queued: usize,
    /// Handlers running.
    pub running: usize,
    /// Retries, and events waiting on the timer to be offered again.
    pub waiting: usize,
    /// How long until the earliest of them is due.
    pub next_due_in: Option<Duration>,
    /// Deferred deliveries ([`Context::defer`](crate::Context::defer)) not yet completed.
    pub deferred: usize,
    /// Per lane (the default one first): its name, the events waiting in its channels and
    /// spill queues, and its handlers running.
    pub lanes: Vec<LanePending>,
    /// Each subscription with deliveries parked (see
    /// [`Subscription::pause`](crate::Subscription::pause)) or waiting behind their key, in
    /// subscription order.
    pub parked: Vec<ParkedPending>,
    /// The keys that dead letters hold (see
    /// [`hold_on_dead_letter`](crate::SubscribeOptions::hold_on_dead_letter)).
    pub held: Vec<crate::stats::HeldKey>,
}

/// The deliveries one subscription had parked when a `flush` gave up.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ParkedPending {
    /// The subscribing service.
    pub service: String,
    /// The handler's name.
    pub handler: String,
    /// Its lane.
    pub lane: String,
    /// Its deliveries parked, on all its lane's shards.
    pub parked: u64,
    /// Whether it is paused.
    pub paused: bool,
}

/// What one lane still held when a `flush` gave up.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LanePending {
    /// The lane's name.
    pub lane: String,
    /// Events waiting in its shards' channels and spill queues.
    pub queued: usize,
    /// Its handlers running.
    pub running: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum FlushErrorKind {
    Timeout(Pending),
    WaitingOnClock(Box<Pending>),
    InHandler,
}

/// `flush` failed: it timed out (saying what remains), all that remains waits for a manual
/// clock to move, or it was called from a handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlushError {
    kind: FlushErrorKind,
}

impl FlushError {
    pub(crate) fn timeout(pending: Pending) -> FlushError {
        FlushError {
            kind: FlushErrorKind::Timeout(pending),
        }
    }

    pub(crate) fn waiting_on_clock(pending: Pending) -> FlushError {
        FlushError {
            kind: FlushErrorKind::WaitingOnClock(Box::new(pending)),
        }
    }

    pub(crate) fn in_handler() -> FlushError {
        FlushError {
            kind: FlushErrorKind::InHandler,
        }
    }

    /// Whether the timeout ran out.
    pub fn is_timeout(&self) -> bool {
        matches!(self.kind, FlushErrorKind::Timeout(_))
    }

    /// Whether it was called from a handler (it would wait for itself).
    pub fn is_in_handler(&self) -> bool {
        matches!(self.kind, FlushErrorKind::InHandler)
    }

    /// Whether, on a bus built on a [`ManualClock`](crate::testing::ManualClock), all that
    /// remained waits for the clock to move (a retry, a delayed publish, an open breaker):
    /// `flush` says so at once instead of waiting out its timeout. [`pending`](Self::pending)
    /// tells how long until the next is due (`next_due_in`).
    pub fn is_waiting_on_clock(&self) -> bool {
        matches!(self.kind, FlushErrorKind::WaitingOnClock(_))
    }

    /// What remained when the timeout ran out, or when only the clock could move it.
    pub fn pending(&self) -> Option<&Pending> {
        match &self.kind {
            FlushErrorKind::Timeout(p) => Some(p),
            FlushErrorKind::WaitingOnClock(p) => Some(p),
            FlushErrorKind::InHandler => None,
        }
    }
}

impl fmt::Display for FlushError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            FlushErrorKind::Timeout(p) => self.describe(f, p),
            FlushErrorKind::WaitingOnClock(p) => self.describe(f, p),
            FlushErrorKind::InHandler => {
                f.write_str("flush called from a handler of the same bus: it would wait for itself")
            }
        }
    }
}

impl FlushError {
    fn describe(&self, f: &mut fmt::Formatter<'_>, p: &Pending) -> fmt::Result {
        if matches!(self.kind, FlushErrorKind::WaitingOnClock(_)) {
            write!(
                f,
                "flush cannot finish until the manual clock moves: {} waiting on the timer",
                p.waiting
            )?;
        } else {
            write!(
                f,
                "flush timed out with {} queued, {} running and {} waiting on the timer",
                p.queued, p.running, p.waiting
            )?;
        }
        if let Some(due) = p.next_due_in {
            write!(f, " (the next due in {due:?})")?;
        }
        if p.deferred > 0 {
            write!(f, "; {} deferred deliveries not completed", p.deferred)?;
        }
        if p.lanes.len() > 1 {
            let lanes: Vec<String> = p
                .lanes
                .iter()
                .filter(|l| l.queued + l.running > 0)
                .map(|l| format!("{}: {} queued, {} running", l.lane, l.queued, l.running))
                .collect();
            write!(f, "; by lane: {}", lanes.join("; "))?;
        }
        if !p.parked.is_empty() {
            let parked: Vec<String> = p
                .parked
                .iter()
                .map(|s| {
                    format!(
                        "{} parked for {} of {} in lane {}{}",
                        s.parked,
                        s.handler,
                        s.service,
                        s.lane,
                        if s.paused { " (paused)" } else { "" }
                    )
                })
                .collect();
            write!(f, "; {}", parked.join("; "))?;
        }
        for h in &p.held {
            write!(
                f,
                "; key {} of {} ({}) held by dead letter {} ({} waiting)",
                h.key, h.handler, h.service, h.dead_letter, h.waiting
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for FlushError {}

/// `shutdown` failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShutdownError {
    /// Called from a handler (or the timer) of the same bus: it would join its own thread.
    InHandler,
}

impl fmt::Display for ShutdownError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InHandler => f.write_str(
                "shutdown called from a handler of the same bus: it would join its own thread",
            ),
        }
    }
}

impl std::error::Error for ShutdownError {}

//! What a handler returns: [`HandlerResult`] and [`HandlerError`], which may say what to do
//! with the failure ([`Verdict`]).
//!
//! Ground rules: a leaf. The handler trait and the [`Context`](crate::Context) a handler runs
//! in live in `context`, beside the engine they reach.

use std::any::Any;
use std::error::Error;
use std::fmt;
use std::time::Duration;

/// What a handler returns.
pub type HandlerResult = Result<(), HandlerError>;

/// A subscription's classifier of failures: see
/// [`SubscribeOptions::retry_if`](crate::SubscribeOptions::retry_if).
pub(crate) type Classifier = std::sync::Arc<dyn Fn(&HandlerError) -> Verdict + Send + Sync>;

/// The error a handler returns: any error, retried by the subscription's policy unless it
/// says otherwise ([`permanent`](Self::permanent), [`retry_after`](Self::retry_after),
/// [`discard`](Self::discard)).
///
/// Every `std::error::Error + Send + Sync + 'static` converts into it, so `?` works in handlers,
/// and the original error stays inside: [`downcast_ref`](Self::downcast_ref) finds it again (a
/// [`retry_if`](crate::SubscribeOptions::retry_if) classifier uses that to decide from the
/// user's own error type). It deliberately does not implement `std::error::Error` itself
/// (that would conflict with the blanket conversion); use [`HandlerError::error`] to reach the
/// underlying error.
///
/// # Examples
///
/// ```
/// use microbus::{HandlerError, Verdict};
/// use std::time::Duration;
///
/// let parse: Result<u32, _> = "x".parse::<u32>();
/// let err = HandlerError::from(parse.unwrap_err());
/// assert!(!err.is_permanent());
/// assert!(err.downcast_ref::<std::num::ParseIntError>().is_some());
/// let fatal = HandlerError::permanent(HandlerError::msg("card declined"));
/// assert!(fatal.is_permanent());
/// assert_eq!(fatal.to_string(), "card declined");
/// let busy = HandlerError::msg("gateway busy").retry_after(Duration::from_secs(2));
/// assert_eq!(busy.verdict(), Some(Verdict::RetryAfter(Duration::from_secs(2))));
/// let stale = HandlerError::discard("an older version of the order");
/// assert_eq!(stale.verdict(), Some(Verdict::Discard));
/// ```
pub struct HandlerError {
    error: Box<dyn Error + Send + Sync + 'static>,
    verdict: Option<Verdict>,
}

/// What becomes of a failed attempt: said by the handler on its [`HandlerError`], or by a
/// subscription's [`retry_if`](crate::SubscribeOptions::retry_if) classifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// Tried again after the policy's delay, while attempts remain; then dead-lettered.
    Retry,
    /// Tried again after this delay instead of the policy's, while attempts remain (the
    /// attempt counts); then dead-lettered.
    RetryAfter(Duration),
    /// Not tried again: dead-lettered at once (reason `Permanent`).
    Permanent,
    /// Not tried again and not dead-lettered: settled as *dropped*, a term of the ledger of
    /// its own ([`BusStats::dropped`](crate::BusStats::dropped)), for a failure that means
    /// the event should be ignored (a stale or duplicate message).
    Discard,
}

impl HandlerError {
    /// An error from a message.
    pub fn msg(message: impl fmt::Display) -> HandlerError {
        HandlerError {
            error: message.to_string().into(),
            verdict: None,
        }
    }

    /// Marks `error` as permanent: retrying cannot help, so the delivery is not retried and
    /// goes to the dead-letter ring at once.
    pub fn permanent(error: impl Into<HandlerError>) -> HandlerError {
        HandlerError {
            verdict: Some(Verdict::Permanent),
            ..error.into()
        }
    }

    /// A failure that drops the event on purpose: never retried, never dead-lettered,
    /// settled as *dropped* ([`Verdict::Discard`]); `reason` is the error's text (kept in
    /// the handler's last error and the trace).
    pub fn discard(reason: impl fmt::Display) -> HandlerError {
        HandlerError {
            verdict: Some(Verdict::Discard),
            ..HandlerError::msg(reason)
        }
    }

    /// Asks for the next attempt after `delay` instead of the policy's delay (say, what a
    /// rate-limited gateway's `Retry-After` said). The attempt counts: with no attempts left
    /// the delivery is dead-lettered as usual. Any duration is accepted: one too long for
    /// the clock to reach never falls due, and waits for shutdown to dead-letter it.
    pub fn retry_after(self, delay: Duration) -> HandlerError {
        HandlerError {
            verdict: Some(Verdict::RetryAfter(delay)),
            ..self
        }
    }

    /// Whether the error was marked permanent.
    pub fn is_permanent(&self) -> bool {
        self.verdict == Some(Verdict::Permanent)
    }

    /// What the handler said should become of the failure, if it said anything
    /// ([`permanent`](Self::permanent), [`retry_after`](Self::retry_after),
    /// [`discard`](Self::discard)); `None` leaves it to the subscription's classifier and
    /// retry policy.
    pub fn verdict(&self) -> Option<Verdict> {
        self.verdict
    }

    /// The underlying error.
    pub fn error(&self) -> &(dyn Error + Send + Sync + 'static) {
        &*self.error
    }

    /// The underlying error as a `T`, if it is one: the error converted with `?` or
    /// [`From`].
    pub fn downcast_ref<T: Error + 'static>(&self) -> Option<&T> {
        self.error.downcast_ref::<T>()
    }

    pub(crate) fn from_panic(payload: Box<dyn Any + Send>) -> HandlerError {
        let text = if let Some(s) = payload.downcast_ref::<&'static str>() {
            (*s).to_owned()
        } else if let Some(s) = payload.downcast_ref::<String>() {
            s.clone()
        } else {
            "a non-string panic payload".to_owned()
        };
        HandlerError::msg(format_args!("handler panicked: {text}"))
    }
}

impl<E: Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(error: E) -> Self {
        HandlerError {
            error: Box::new(error),
            verdict: None,
        }
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("error", &self.error)
            .field("verdict", &self.verdict)
            .finish()
    }
}

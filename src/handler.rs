//! What a handler returns: [`HandlerResult`] and [`HandlerError`] (retryable or permanent).
//!
//! Ground rules: a leaf. The handler trait and the [`Context`](crate::Context) a handler runs
//! in live in `context`, beside the engine they reach.

use std::any::Any;
use std::error::Error;
use std::fmt;

/// What a handler returns.
pub type HandlerResult = Result<(), HandlerError>;

/// The error a handler returns: any error, retryable unless made [`permanent`](Self::permanent).
///
/// Every `std::error::Error + Send + Sync + 'static` converts into it, so `?` works in handlers.
/// It deliberately does not implement `std::error::Error` itself (that would conflict with the
/// blanket conversion); use [`HandlerError::error`] to reach the underlying error.
///
/// # Examples
///
/// ```
/// use microbus::HandlerError;
///
/// let parse: Result<u32, _> = "x".parse::<u32>();
/// let err = HandlerError::from(parse.unwrap_err());
/// assert!(!err.is_permanent());
/// let fatal = HandlerError::permanent(HandlerError::msg("card declined"));
/// assert!(fatal.is_permanent());
/// assert_eq!(fatal.to_string(), "card declined");
/// ```
pub struct HandlerError {
    error: Box<dyn Error + Send + Sync + 'static>,
    permanent: bool,
}

impl HandlerError {
    /// An error from a message.
    pub fn msg(message: impl fmt::Display) -> HandlerError {
        HandlerError {
            error: message.to_string().into(),
            permanent: false,
        }
    }

    /// Marks `error` as permanent: retrying cannot help, so the delivery is not retried.
    pub fn permanent(error: impl Into<HandlerError>) -> HandlerError {
        HandlerError {
            permanent: true,
            ..error.into()
        }
    }

    /// Whether the error was marked permanent.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }

    /// The underlying error.
    pub fn error(&self) -> &(dyn Error + Send + Sync + 'static) {
        &*self.error
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
            permanent: false,
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
            .field("permanent", &self.permanent)
            .finish()
    }
}

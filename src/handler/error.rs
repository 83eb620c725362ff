//! The handler's error type: what a [`Handler`](crate::Handler) returns when a record fails,
//! carrying the error chain as text, the [`FailureKind`] the handler chose and any delay it
//! asked for. Kept apart from the vocabulary in [`crate::outcome`] because this is the
//! user-facing constructor surface (`?`, [`ResultExt`]); the retry policy turns it into a
//! [`Disposition`](crate::Disposition).

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use crate::outcome::FailureKind;

/// The error a [`Handler`](crate::Handler) returns.
///
/// `?` on any `std::error::Error` gives a *retryable* error carrying the whole error chain as
/// text (`outer: cause: root cause`). Use [`HandlerError::permanent`] (or
/// [`ResultExt::permanent`]) for failures that retrying cannot fix, and
/// [`HandlerError::retry_after`] to ask for a specific delay.
///
/// Like `anyhow::Error`, this type deliberately does not implement `std::error::Error`, so
/// that the blanket `From` conversion behind `?` can exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    /// What the handler says about the failure: retryable, permanent or poison. The retry
    /// policy turns it, with the attempt count, into a [`Disposition`](crate::Disposition).
    kind: FailureKind,
    /// The error chain as text (`outer: cause: root cause`), flattened once: it is what the
    /// envelope's `sidetrack-error` header, the logs and the alerts show.
    message: String,
    /// A delay the handler asked for ([`HandlerError::retry_after`]); the policy picks the
    /// first tier whose delay is at least this long.
    retry_after: Option<Duration>,
}

/// Anything `?` or the constructors accept: an error, a `String` or a `&str`.
type BoxError = Box<dyn StdError + Send + Sync + 'static>;

impl HandlerError {
    /// One constructor behind the three public ones: the kind, and the chain flattened.
    fn from_boxed(kind: FailureKind, error: BoxError) -> Self {
        HandlerError {
            kind,
            message: chain_text(&*error),
            retry_after: None,
        }
    }

    /// A failure worth retrying. Accepts an error, a `String` or a `&str`.
    pub fn retryable(error: impl Into<BoxError>) -> Self {
        Self::from_boxed(FailureKind::Retryable, error.into())
    }

    /// A failure that retrying cannot fix: the record is dead-lettered as `permanent`.
    pub fn permanent(error: impl Into<BoxError>) -> Self {
        Self::from_boxed(FailureKind::Permanent, error.into())
    }

    /// Unreadable input: the record is dead-lettered as `poison`.
    pub fn poison(error: impl Into<BoxError>) -> Self {
        Self::from_boxed(FailureKind::Poison, error.into())
    }

    /// Asks for the next attempt no sooner than `delay` from now. The runtime picks the first
    /// retry tier whose delay is at least `delay` (the longest tier if none is); see
    /// [`RetryPolicy::decide`](crate::RetryPolicy::decide).
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use sidetrack::{FailureKind, HandlerError};
    ///
    /// let e = HandlerError::retryable("HTTP 429 from the payments API")
    ///     .retry_after(Duration::from_secs(30));
    /// assert_eq!(e.kind(), FailureKind::Retryable);
    /// assert_eq!(e.requested_delay(), Some(Duration::from_secs(30)));
    /// ```
    pub fn retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// How this failure is treated.
    pub fn kind(&self) -> FailureKind {
        self.kind
    }

    /// The error chain as text.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The delay the handler asked for, if any.
    pub fn requested_delay(&self) -> Option<Duration> {
        self.retry_after
    }

    /// A handler that panicked (while creating its future or while it ran): retryable, since a
    /// panic is most often a bug met by one input at one moment, with the panic's message kept.
    pub(crate) fn panicked(payload: &(dyn std::any::Any + Send)) -> Self {
        HandlerError {
            kind: FailureKind::Retryable,
            message: format!("handler panicked: {}", panic_text(payload)),
            retry_after: None,
        }
    }
}

/// The message of a panic payload (`&str` or `String`), for reports.
pub(crate) fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl<E> From<E> for HandlerError
where
    E: StdError + Send + Sync + 'static,
{
    /// Ordinary errors are retryable.
    fn from(error: E) -> Self {
        HandlerError {
            kind: FailureKind::Retryable,
            message: chain_text(&error),
            retry_after: None,
        }
    }
}

/// The error and its `source()` chain joined with `: `, skipping a cause whose text the
/// previous message already ends with (many errors include their source in their own
/// message).
fn chain_text(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Many errors repeat their source in their own message; do not say it twice.
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Classifies the error of a `Result` in one call: `db.get(id).await.permanent()?`.
///
/// # Example
///
/// ```
/// use sidetrack::{FailureKind, HandlerError, ResultExt};
///
/// fn parse_amount(text: &str) -> Result<i64, HandlerError> {
///     // A malformed amount will not parse better later: dead-letter it as poison.
///     text.parse::<i64>().poison()
/// }
/// assert_eq!(parse_amount("12").unwrap(), 12);
/// let e = parse_amount("twelve").unwrap_err();
/// assert_eq!(e.kind(), FailureKind::Poison);
/// assert_eq!(e.message(), "invalid digit found in string");
/// ```
pub trait ResultExt<T> {
    /// Maps the error to a retryable [`HandlerError`].
    fn retryable(self) -> Result<T, HandlerError>;
    /// Maps the error to a permanent [`HandlerError`].
    fn permanent(self) -> Result<T, HandlerError>;
    /// Maps the error to a poison [`HandlerError`].
    fn poison(self) -> Result<T, HandlerError>;
}

impl<T, E: Into<BoxError>> ResultExt<T> for Result<T, E> {
    fn retryable(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::retryable)
    }
    fn permanent(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::permanent)
    }
    fn poison(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::poison)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("saving order")]
    struct Outer(#[source] std::io::Error);

    fn fails() -> Result<(), HandlerError> {
        Err(Outer(std::io::Error::other("disk full")))?;
        Ok(())
    }

    #[test]
    fn question_mark_is_retryable_with_chain() {
        let e = fails().unwrap_err();
        assert_eq!(e.kind(), FailureKind::Retryable);
        assert_eq!(e.message(), "saving order: disk full");
    }

    #[test]
    fn explicit_kinds_and_delay() {
        let e = HandlerError::permanent("negative amount");
        assert_eq!(e.kind(), FailureKind::Permanent);
        assert_eq!(e.to_string(), "negative amount");
        let e = HandlerError::retryable("busy").retry_after(Duration::from_secs(5));
        assert_eq!(e.requested_delay(), Some(Duration::from_secs(5)));
        let r: Result<(), std::io::Error> = Err(std::io::Error::other("x"));
        assert_eq!(r.permanent().unwrap_err().kind(), FailureKind::Permanent);
    }

    #[test]
    fn panic_payloads_are_described() {
        let e = HandlerError::panicked(&"boom");
        assert_eq!(e.message(), "handler panicked: boom");
        assert_eq!(e.kind(), FailureKind::Retryable);
        let e = HandlerError::panicked(&String::from("index out of bounds"));
        assert_eq!(e.message(), "handler panicked: index out of bounds");
        let e = HandlerError::panicked(&42u32);
        assert_eq!(e.message(), "handler panicked: non-string panic payload");
    }
}

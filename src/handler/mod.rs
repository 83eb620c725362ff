//! The handler API: the [`Handler`] trait, the [`Message`] it receives, the
//! [`HandlerError`] it returns, and [`handler_fn`] for plain async closures.
//!
//! ```
//! use sidetrack::{handler_fn, HandlerError, Message, Context};
//!
//! let handler = handler_fn(|msg: Message, _cx: Context| async move {
//!     let text = msg.payload_str()?;
//!     if text.is_empty() {
//!         return Err(HandlerError::permanent("empty order"));
//!     }
//!     Ok(())
//! });
//! # let _ = handler;
//! ```
//!
//! Outcomes:
//!
//! | handler returns | what happens |
//! |---|---|
//! | `Ok(())` | the offset is stored |
//! | retryable error (`?` on any error), or a panic | next retry tier, or DLQ `exhausted` |
//! | [`HandlerError::permanent`] | DLQ `permanent` at once |
//! | [`HandlerError::poison`], or a failed [`Message::json`] | DLQ `poison` at once |

mod error;
mod header;
mod message;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use crate::outcome::FailureKind;
pub(crate) use error::panic_text;
pub use error::{HandlerError, ResultExt};
pub use header::to_owned_headers as rdkafka_headers;
pub(crate) use header::to_owned_headers;
pub use header::Header;
pub(crate) use header::{headers_of, headers_of_ptr};
pub use message::Message;

/// Handles one record.
///
/// Implement it with `async fn`:
///
/// ```
/// use sidetrack::{Context, Handler, HandlerError, Message};
///
/// struct Audit;
///
/// impl Handler for Audit {
///     async fn handle(&self, msg: &Message, cx: &Context) -> Result<(), HandlerError> {
///         tracing::info!(group = cx.group(), offset = msg.offset(), "seen");
///         Ok(())
///     }
/// }
/// ```
///
/// By default records of one partition are handled one at a time, in order, and partitions in
/// parallel; with [`Config::ordering`](crate::Config::ordering) set to `key` or `unordered`
/// several records of a partition run at once. The handler is shared (`&self`) and must be
/// `Send + Sync`. A panic is caught and treated as a retryable failure with the panic message
/// recorded.
pub trait Handler: Send + Sync + 'static {
    /// Handles `msg`. `Ok` stores its offset; an error sends it to a retry tier or the DLQ.
    fn handle(
        &self,
        msg: &Message,
        cx: &Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// This handler's own time limit per call, instead of
    /// [`Config::handler_timeout`](crate::Config::handler_timeout) (`None`, the default: the
    /// config's). When it passes, the call's future is dropped and the record is a retryable
    /// failure ("timed out after …") that goes to its retry tier, or to the DLQ when no retry
    /// is left. Read once when a partition task starts, not per record; clamped to 1 ms – 24 h.
    ///
    /// The limit belongs with the code that knows how long its work may take (a handler that
    /// calls a slow batch API), so it travels with the handler type; deployments tune the
    /// default for every other handler in the config.
    ///
    /// ```
    /// use std::time::Duration;
    /// use sidetrack::{Context, Handler, HandlerError, Message};
    ///
    /// struct Reindex;
    ///
    /// impl Handler for Reindex {
    ///     async fn handle(&self, _msg: &Message, _cx: &Context) -> Result<(), HandlerError> {
    ///         Ok(())
    ///     }
    ///     fn timeout(&self) -> Option<Duration> {
    ///         Some(Duration::from_secs(300))
    ///     }
    /// }
    /// ```
    fn timeout(&self) -> Option<Duration> {
        None
    }
}

/// A [`Handler`] made from an async closure; see [`handler_fn`].
#[derive(Clone)]
pub struct HandlerFn<F> {
    /// The closure, called with a clone of each message (owned, so its future may be `'static`).
    f: F,
    /// The time limit set by [`HandlerFn::with_timeout`]; `None` uses `handler_timeout`.
    timeout: Option<Duration>,
}

impl<F> HandlerFn<F> {
    /// This handler's own time limit per call; see [`Handler::timeout`].
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

/// Makes a [`Handler`] from a closure taking an owned [`Message`] and [`Context`] (both cheap
/// to clone) and returning a future.
///
/// The message is cloned for each call (its bytes copied once) so that the closure's future
/// may own it; a [`Handler`] implementation borrows it instead, and is the choice when that
/// copy matters.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use sidetrack::{handler_fn, Context, HandlerError, Message};
///
/// let handler = handler_fn(|msg: Message, cx: Context| async move {
///     if cx.is_shutting_down() {
///         // Retried after the restart rather than cut off half way.
///         return Err(HandlerError::retryable("shutting down"));
///     }
///     let _order: serde_json::Value = msg.json()?;
///     Ok(())
/// })
/// .with_timeout(Duration::from_secs(5));
/// # let _ = handler;
/// ```
pub fn handler_fn<F, Fut>(f: F) -> HandlerFn<F>
where
    F: Fn(Message, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    HandlerFn { f, timeout: None }
}

impl<F, Fut> Handler for HandlerFn<F>
where
    F: Fn(Message, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    fn handle(
        &self,
        msg: &Message,
        cx: &Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        (self.f)(msg.clone(), cx.clone())
    }

    fn timeout(&self) -> Option<Duration> {
        self.timeout
    }
}

/// What the handler may want to know about the runtime around it.
#[derive(Clone, Debug)]
pub struct Context {
    /// Shared by every clone: one allocation per runtime, and a clone per `handler_fn` call
    /// costs one reference count.
    inner: Arc<ContextInner>,
}

/// What a [`Context`] shares.
#[derive(Debug)]
struct ContextInner {
    /// The main consumer group's name.
    group: String,
    /// Cancelled when the runtime begins shutting down.
    shutdown: CancellationToken,
}

impl Context {
    /// The context of one runtime: its group and its shutdown signal.
    pub(crate) fn new(group: String, shutdown: CancellationToken) -> Self {
        Context {
            inner: Arc::new(ContextInner { group, shutdown }),
        }
    }

    /// The consumer group (of the main consumer, also for retried records).
    pub fn group(&self) -> &str {
        &self.inner.group
    }

    /// Feature `otel`: the trace context of the current span — the record's `process` span, or
    /// a span of the handler's own nested in it — so the handler can call other services in the
    /// same trace (write [`RecordContext::parent`](crate::telemetry::RecordContext) as their
    /// `traceparent` header; [`Context::traceparent`] does). `None` when nothing records spans
    /// (no `[tracing]`, or the span is filtered out).
    #[cfg(feature = "otel")]
    pub fn trace_context(&self) -> Option<crate::telemetry::RecordContext> {
        crate::telemetry::span::context_of(&tracing::Span::current())
    }

    /// Feature `otel`: the `traceparent` header value of the current span (see
    /// [`Context::trace_context`]).
    #[cfg(feature = "otel")]
    pub fn traceparent(&self) -> Option<String> {
        self.trace_context().map(|cx| cx.parent.to_string())
    }

    /// True once shutdown has begun. Long handlers may check it and return a retryable error
    /// early: the record is then delivered again after restart.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutdown.is_cancelled()
    }

    /// Completes when shutdown begins, for use in `tokio::select!`.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancelled().await
    }
}

/// Runs a handler of a known type (static dispatch, no boxing), turning a panic into a
/// retryable error: both a panic while the future is created and one while it runs.
pub(crate) fn invoke_static<'a, H: Handler>(
    handler: &'a H,
    msg: &'a Message,
    cx: &'a Context,
) -> CatchPanics<impl Future<Output = Result<(), HandlerError>> + Send + 'a> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| handler.handle(msg, cx))) {
        Ok(future) => CatchPanics::Running { future },
        Err(payload) => CatchPanics::Panicked {
            error: Some(HandlerError::panicked(&*payload)),
        },
    }
}

pin_project_lite::pin_project! {
    /// A handler call whose panics become retryable errors. Polled in place: the handler's
    /// future is not moved again after it was created (the runtime calls this per record).
    #[project = CatchPanicsProj]
    pub(crate) enum CatchPanics<F> {
        /// The handler's future.
        Running { #[pin] future: F },
        /// Creating it panicked; the error is returned on the first poll.
        Panicked { error: Option<HandlerError> },
    }
}

impl<F: Future<Output = Result<(), HandlerError>>> Future for CatchPanics<F> {
    type Output = Result<(), HandlerError>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.project() {
            CatchPanicsProj::Running { future } => {
                match std::panic::catch_unwind(AssertUnwindSafe(|| future.poll(cx))) {
                    Ok(poll) => poll,
                    Err(payload) => std::task::Poll::Ready(Err(HandlerError::panicked(&*payload))),
                }
            }
            CatchPanicsProj::Panicked { error } => std::task::Poll::Ready(Err(error
                .take()
                .unwrap_or_else(|| HandlerError::retryable("handler polled after it panicked")))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Panics;
    impl Handler for Panics {
        async fn handle(&self, _msg: &Message, _cx: &Context) -> Result<(), HandlerError> {
            panic!("kaboom")
        }
    }

    #[tokio::test]
    async fn panics_become_retryable_errors() {
        let cx = Context::new("g".into(), CancellationToken::new());
        let msg = Message::new("t", b"x".to_vec());
        let err = invoke_static(&Panics, &msg, &cx).await.unwrap_err();
        assert_eq!(err.kind(), FailureKind::Retryable);
        assert_eq!(err.message(), "handler panicked: kaboom");
    }

    /// A closure that panics before it returns its future (the synchronous part).
    #[tokio::test]
    async fn panics_before_the_future_exists_are_caught_too() {
        let h = handler_fn(|m: Message, _cx: Context| {
            assert!(m.payload() != Some(b"boom"), "sync boom");
            async move { Ok(()) }
        });
        let cx = Context::new("g".into(), CancellationToken::new());
        let err = invoke_static(&h, &Message::new("t", b"boom".to_vec()), &cx)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), FailureKind::Retryable);
        assert!(err.message().contains("sync boom"), "{}", err.message());

        struct Eager;
        impl Handler for Eager {
            #[allow(clippy::manual_async_fn)]
            fn handle(
                &self,
                msg: &Message,
                _cx: &Context,
            ) -> impl Future<Output = Result<(), HandlerError>> + Send {
                let n: u32 = std::str::from_utf8(msg.payload().unwrap_or_default())
                    .unwrap()
                    .parse()
                    .unwrap();
                async move {
                    let _ = n;
                    Ok(())
                }
            }
        }
        let err = invoke_static(&Eager, &Message::new("t", b"not a number".to_vec()), &cx)
            .await
            .unwrap_err();
        assert!(
            err.message().starts_with("handler panicked"),
            "{}",
            err.message()
        );
    }

    #[tokio::test]
    async fn closures_are_handlers() {
        let h = handler_fn(|m: Message, cx: Context| async move {
            assert_eq!(cx.group(), "g");
            m.json::<u32>().map(|_| ())
        });
        let cx = Context::new("g".into(), CancellationToken::new());
        assert!(invoke_static(&h, &Message::new("t", b"7".to_vec()), &cx)
            .await
            .is_ok());
        let err = invoke_static(&h, &Message::new("t", b"x".to_vec()), &cx)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), FailureKind::Poison);
    }
}

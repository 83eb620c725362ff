//! The call stage: invoke the handler on one record, time it, bound it, and conclude what its
//! result means — written once, for both record loops and for the test kit's
//! [`TestRuntime`](crate::testing::TestRuntime), so that what a test sees is what production
//! does.
//!
//! - **Invoke**: static dispatch ([`invoke_static`]: a panic, while the future is made or while
//!   it runs, becomes a retryable error), watched by the watchdog (blocking polls, oldest
//!   call).
//! - **Timing**: a call that returns at once costs no clock read unless it is one of the
//!   sampled ones (one in [`SAMPLE_EVERY`]); a call that waits is always timed, and gets one
//!   timer, set first to the slow-call warning and then to the time limit.
//! - **Bound**: at the time limit the call's future is dropped (cancelled) and the record fails
//!   with a retryable "timed out" error.
//! - **Conclude**: done, or the retry/DLQ decision of the policy with the error text.
//! - **Due-time wait** ([`DueWait`]): a record read from a retry tier is not called before it
//!   is due; the partition is paused for long waits.
//!
//! While a call waits, the caller may have other work (the sequential loop settles hand-offs
//! and watches for a revoke): it lends it as a [`Meanwhile`], so the select loop exists once.

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, Either};
use tokio::time::Sleep;
use tracing::Instrument;

use crate::config::Config;
use crate::handler::{invoke_static, Context, Handler, HandlerError, Message};
use crate::key_order::wire::Ended;
use crate::outcome::Disposition;
use crate::outcome::Reason;
use crate::retry::scheduler::{self, elapsed_secs, now_ms};
use crate::retry::RetryPolicy;
use crate::runtime::handoff::Abandoned;
use crate::runtime::pause::Pause;
use crate::runtime::signal::Signal;
use crate::runtime::watchdog::Calls;

use super::intake::Invalid;
use super::meters::{CallMeters, Meters};

/// One in this many handler calls that finish without waiting is timed (the others cost no
/// clock reads); calls that wait are always timed.
pub(crate) const SAMPLE_EVERY: u32 = 16;

/// At most this many characters of a key are shown in a log line.
const SHOWN_KEY_CHARS: usize = 64;

/// What handling a record left to do.
pub(crate) enum Step {
    /// Handled: durable.
    Done,
    /// Failed: to be handed to a retry tier or the DLQ, with the error text.
    HandOff(Message, Disposition, String),
    /// `keep_key_order`: its key waits behind the head at this source offset; appended to the
    /// key-order log instead of run, durable when the log acknowledges it.
    Hold(Message, i64),
    /// `keep_key_order`: a head handled (on its tier, or read again on its source); durable
    /// once its `release` is in the key-order log.
    Release(Message, Ended),
}

/// What a handler's result means: `None` when handled, else where the record goes next and
/// the error text.
pub(crate) type Concluded = Option<(Disposition, String)>;

/// When a handler call is warned about and when it is cancelled.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// `None` when not shorter than the limit (the timeout is reported instead).
    warn_after: Option<Duration>,
    /// When the call is cancelled and the record retried (`handler_timeout`, or the handler's own).
    timeout: Duration,
}

impl Limits {
    /// The limits under `config` for a handler whose time limit is `timeout` (the config's
    /// `handler_timeout`, or the handler's own), clamped to what the config allows.
    pub(crate) fn new(config: &Config, timeout: Duration) -> Self {
        let timeout = timeout.clamp(Duration::from_millis(1), crate::config::MAX_HANDLER_TIMEOUT);
        Limits {
            warn_after: (config.handler_warn_after < timeout).then_some(config.handler_warn_after),
            timeout,
        }
    }

    /// The limits for `handler` under `config`: its own time limit if it has one.
    pub(crate) fn of<H: Handler + ?Sized>(config: &Config, handler: &H) -> Self {
        Limits::new(
            config,
            Handler::timeout(handler).unwrap_or(config.handler_timeout),
        )
    }
}

/// Which deadline a waiting handler call's timer is set to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The slow-call warning.
    Warn,
    /// The time limit.
    Limit,
}

/// What the caller's other work asks of a waiting call (see [`Meanwhile`]).
pub(crate) enum Interrupt<E> {
    /// Drop the call at once; the caller ends with `E`.
    Abandon(E),
    /// Let the call run on, up to its time limit (its result is not used), then the caller
    /// ends with `E`.
    Finish(E),
}

/// Work a caller does while one of its handler calls waits.
pub(crate) trait Meanwhile {
    /// How the caller ends when it interrupts the call.
    type End;
    /// The call did not return at once (called once per waiting call, before its timer is
    /// set): a moment to publish what the caller did so far.
    fn call_waits(&mut self);
    /// Does the caller's other work; resolves only when the call must be interrupted. Must be
    /// cancel safe: it is dropped whenever the call or its timer is ready first, and made
    /// again.
    fn interrupted(&mut self) -> impl Future<Output = Interrupt<Self::End>> + Send;
}

/// No other work while a call waits (the concurrent loop: each record is a future of its own).
pub(crate) struct Nothing;

impl Meanwhile for Nothing {
    type End = std::convert::Infallible;
    #[inline]
    fn call_waits(&mut self) {}
    fn interrupted(&mut self) -> impl Future<Output = Interrupt<Self::End>> + Send {
        std::future::pending()
    }
}

/// The call stage of one partition task (or of the test kit): its limits, sampling and
/// metric handles. Built once; every call borrows it.
pub(crate) struct Caller {
    /// The warn and cancel times of every call, resolved once from the config and the handler.
    limits: Limits,
    /// Handler calls so far, for sampling their duration.
    calls: AtomicU32,
    /// Processing time by outcome and the timeout counter, registered once per task.
    meters: CallMeters,
    /// The handler calls as the watchdog sees them (oldest-call gauge, blocking polls).
    watched: Arc<Calls>,
}

impl Caller {
    /// A call stage with `limits`, reporting to `meters` and watched through `watched`.
    pub(crate) fn new(limits: Limits, meters: CallMeters, watched: Arc<Calls>) -> Self {
        Caller {
            limits,
            calls: AtomicU32::new(0),
            meters,
            watched,
        }
    }

    /// Sets the limits (the handler's own time limit, known once its type is).
    pub(crate) fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Calls `handler` on `msg` in watchdog slot `slot` and concludes: `Ok(None)` handled,
    /// `Ok(Some(..))` where it goes next (a panic, an error or the time limit), or `Err` when
    /// `meanwhile` interrupted the call.
    ///
    /// `span`, when given, is entered while the call is polled. `timer` is the caller's timer
    /// slot: set only when the call waits (a caller that makes many calls keeps one and it is
    /// reset; `None` in it is filled on first use).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub(crate) async fn call<H: Handler, M: Meanwhile>(
        &self,
        handler: &H,
        msg: &Message,
        (cx, policy): (&Context, &RetryPolicy),
        slot: usize,
        span: Option<tracing::Span>,
        mut timer: Pin<&mut Option<Sleep>>,
        meanwhile: &mut M,
    ) -> Result<Concluded, M::End> {
        #[cfg(feature = "otel")]
        let traced = span.clone();
        let (sampled, started) = self.clock_for_call();
        let (result, elapsed) = {
            let call = self
                .watched
                .watched(slot, msg.offset(), || invoke_static(handler, msg, cx));
            let mut call = pin!(match span {
                Some(span) => Either::Left(call.instrument(span)),
                None => Either::Right(call),
            });
            // A handler that returns at once costs nothing more; one that waits shows in the
            // in-flight gauges while it does, and the caller's other work goes on.
            match futures_util::poll!(call.as_mut()) {
                Poll::Ready(result) => (result, sampled.then(|| started.elapsed())),
                Poll::Pending => {
                    let started = started.or_now();
                    meanwhile.call_waits();
                    // Only calls that wait get a timer: one, set to the warning and then to
                    // the time limit.
                    let (deadline, mut stage) = self.first_deadline(started);
                    match timer.as_mut().as_pin_mut() {
                        Some(t) => t.reset(deadline),
                        None => timer.set(Some(tokio::time::sleep_until(deadline))),
                    }
                    let Some(mut timer) = timer.as_pin_mut() else {
                        unreachable!("the timer was set above")
                    };
                    let result = loop {
                        tokio::select! {
                            biased;
                            result = &mut call => break result,
                            _ = &mut timer => {
                                if let Some(e) = self.timer_fired(msg, &mut stage, timer.as_mut(), started) {
                                    break Err(e);
                                }
                            }
                            interrupt = meanwhile.interrupted() => match interrupt {
                                Interrupt::Abandon(end) => return Err(end),
                                Interrupt::Finish(end) => {
                                    // Bounded by the call's time limit, like any call.
                                    let limit = deadline_at(started, self.limits.timeout);
                                    let _ = tokio::time::timeout_at(limit, call).await;
                                    return Err(end);
                                }
                            },
                        }
                    };
                    (result, Some(started.elapsed()))
                }
            }
        };
        let concluded = self.conclude(msg, result, elapsed, policy);
        // Feature `otel`: the outcome on the record's `process` span (given here, or entered
        // around the whole record by the concurrent loop).
        // Only a traced record (its context remembered): an unsampled one has no span to
        // record on, and looking up the current span would cost every record.
        #[cfg(feature = "otel")]
        if msg.trace().is_some() {
            crate::telemetry::runtime::record_outcome(
                &traced.unwrap_or_else(tracing::Span::current),
                concluded.as_ref().map(|(d, _)| *d),
            );
        }
        Ok(concluded)
    }

    /// The first deadline of a call that waits: its slow-call warning, or its time limit.
    fn first_deadline(&self, started: Instant) -> (tokio::time::Instant, Stage) {
        match self.limits.warn_after {
            Some(warn) => (deadline_at(started, warn), Stage::Warn),
            None => (deadline_at(started, self.limits.timeout), Stage::Limit),
        }
    }

    /// A waiting call's timer fired: the warning (logged once; the timer is set to the time
    /// limit), or the time limit: the error the call ends with (its future is then dropped).
    fn timer_fired(
        &self,
        msg: &Message,
        stage: &mut Stage,
        timer: Pin<&mut Sleep>,
        started: Instant,
    ) -> Option<HandlerError> {
        let limit = self.limits.timeout;
        match *stage {
            Stage::Warn => {
                tracing::warn!(
                    topic = msg.topic(), partition = msg.partition(), offset = msg.offset(),
                    key = %shown_key(msg.key()), attempt = msg.attempt(),
                    running_for = ?started.elapsed(), timeout = ?limit,
                    "slow handler call: still running; it is cancelled at its time limit (handler_timeout)"
                );
                *stage = Stage::Limit;
                timer.reset(deadline_at(started, limit));
                None
            }
            Stage::Limit => {
                self.meters.timeouts.increment(1);
                let error = format!("timed out after {}", humantime::format_duration(limit));
                tracing::warn!(
                    topic = msg.topic(), partition = msg.partition(), offset = msg.offset(),
                    key = %shown_key(msg.key()), attempt = msg.attempt(), timeout = ?limit,
                    "handler call timed out: cancelled, the record goes to its retry tier (or the DLQ)"
                );
                Some(HandlerError::retryable(error))
            }
        }
    }

    /// Whether this call is timed even if it returns at once (one in [`SAMPLE_EVERY`]), and
    /// when it started (read only then; a call that waits reads it after its first poll).
    #[inline]
    fn clock_for_call(&self) -> (bool, LazyInstant) {
        let sampled = self.calls.fetch_add(1, Ordering::Relaxed) % SAMPLE_EVERY == 0;
        (sampled, LazyInstant(sampled.then(Instant::now)))
    }

    /// What the handler's result means: done (`None`), or a hand-off to a retry tier or the
    /// DLQ, with the error text.
    fn conclude(
        &self,
        msg: &Message,
        result: Result<(), HandlerError>,
        elapsed: Option<Duration>,
        policy: &RetryPolicy,
    ) -> Concluded {
        let elapsed = elapsed.map(|d| d.as_secs_f64());
        match result {
            Ok(()) => {
                if let Some(e) = elapsed {
                    self.meters.processing_handled.record(e);
                }
                None
            }
            Err(error) => {
                let decision = policy.decide(msg.attempt(), &error);
                if let Some(e) = elapsed {
                    match decision {
                        Disposition::Retry { .. } => self.meters.processing_retry.record(e),
                        Disposition::DeadLetter(_) => self.meters.processing_dead_letter.record(e),
                    }
                }
                tracing::debug!(
                    topic = msg.topic(), partition = msg.partition(), offset = msg.offset(),
                    attempt = msg.attempt(),
                    error = %crate::escape::for_terminal(error.message(), crate::escape::LOG_FIELD_CHARS),
                    ?decision, "handler failed"
                );
                Some((decision, error.message().to_owned()))
            }
        }
    }
}

/// The conclusion for a record whose envelope cannot be trusted: the DLQ, without a call.
pub(crate) fn invalid(Invalid { msg, reason }: Invalid) -> Step {
    tracing::warn!(
        topic = msg.topic(), partition = msg.partition(),
        reason = %crate::escape::for_terminal(&reason, crate::escape::LOG_FIELD_CHARS),
        "invalid retry envelope"
    );
    Step::HandOff(
        msg,
        Disposition::DeadLetter(Reason::InvalidEnvelope),
        reason,
    )
}

/// A handler whose type is erased, called through the generic path above (for callers that
/// hold no handler type: the test kit). The runtime erases the handler once per partition
/// task instead (`RunPartition`), so its per-record calls stay static.
pub(crate) trait ErasedCall: Send + Sync + 'static {
    /// This handler's limits under `config`.
    /// [`Limits::of`] for this handler type.
    fn limits(&self, config: &Config) -> Limits;
    /// Calls the handler on `msg` through `caller` and concludes (see [`Caller::call`]).
    fn call<'a>(
        &'a self,
        caller: &'a Caller,
        msg: &'a Message,
        cx: &'a Context,
        policy: &'a RetryPolicy,
    ) -> BoxFuture<'a, Concluded>;
}

impl<H: Handler> ErasedCall for H {
    fn limits(&self, config: &Config) -> Limits {
        Limits::of(config, self)
    }

    /// One call through the call stage with nothing to do meanwhile, boxed: the test kit's way in,
    /// where one allocation per call is no cost.
    fn call<'a>(
        &'a self,
        caller: &'a Caller,
        msg: &'a Message,
        cx: &'a Context,
        policy: &'a RetryPolicy,
    ) -> BoxFuture<'a, Concluded> {
        Box::pin(async move {
            let timer = pin!(None);
            match caller
                .call(self, msg, (cx, policy), 0, None, timer, &mut Nothing)
                .await
            {
                Ok(concluded) => concluded,
                Err(never) => match never {},
            }
        })
    }
}

/// The due-time wait of a retry tier partition: records are not called before they are due.
pub(crate) struct DueWait {
    /// Retry records waiting for their due time; while one does, no later record is taken (a
    /// tier is first-in-first-due, the later ones are not due earlier).
    waiting: AtomicUsize,
    /// The partition's pause, held during long waits.
    pause: Arc<Pause>,
    /// The task is stopping: a wait for a due time ends at once (the record is not called).
    stop: Signal,
    /// The partition was revoked: the same, another consumer takes it from the frontier.
    revoked: Signal,
    /// How long before the due time a paused partition is resumed (see [`resume_ahead`]).
    resume_ahead: Duration,
}

impl DueWait {
    /// The due-time wait of a partition paused through `pause`, under `config`, ending early
    /// on `stop` or `revoked`.
    pub(crate) fn new(config: &Config, pause: Arc<Pause>, stop: Signal, revoked: Signal) -> Self {
        DueWait {
            waiting: AtomicUsize::new(0),
            pause,
            stop,
            revoked,
            resume_ahead: resume_ahead(config),
        }
    }

    /// Whether a record is waiting for its due time (no later record is taken meanwhile).
    #[inline]
    pub(crate) fn is_waiting(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) != 0
    }

    /// Waits until the record is due (see [`scheduler::wait_for`]). For longer waits the
    /// partition is paused, so nothing is fetched (or polled) meanwhile, and resumed
    /// [`resume_ahead`] before the due time: pausing drops librdkafka's prefetched records,
    /// and refetching them after a resume takes up to one fetch long-poll, which would
    /// otherwise make every retry that late. No later record is taken meanwhile.
    pub(crate) async fn until_due(
        &self,
        due: i64,
        written_at: Option<i64>,
    ) -> Result<(), Abandoned> {
        let wait = scheduler::wait_for(due, written_at, now_ms());
        // Due already: no timer at all. Tokio's timer rounds up to the next millisecond tick,
        // and a burst of records due within the same few milliseconds would otherwise wait
        // for one tick each, in turn (measured: p50 lateness 667 ms on a 10k burst).
        if wait.is_zero() {
            return Ok(());
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = DecrementOnDrop(&self.waiting);
        let start = tokio::time::Instant::now();
        if let Some(paused_for) = wait.checked_sub(self.resume_ahead).filter(|d| !d.is_zero()) {
            let _paused = self.pause.hold();
            if !self.sleep_until(start + paused_for).await {
                return Err(Abandoned::Told);
            }
        }
        if self.sleep_until(start + wait).await {
            Ok(())
        } else {
            Err(Abandoned::Told)
        }
    }

    /// Sleeps until `deadline`; false if the task was stopped or revoked first.
    async fn sleep_until(&self, deadline: tokio::time::Instant) -> bool {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => true,
            _ = self.stop.cancelled() => false,
            _ = self.revoked.cancelled() => false,
        }
    }
}

/// Lateness and end-to-end latency of a retried record, once it is due.
pub(crate) fn retried_metrics(meters: &Meters, msg: &Message, due: i64) {
    // Only retry tier partitions read records with an envelope.
    if let Some(meters) = &meters.retry {
        let now = now_ms();
        meters.lateness.record(elapsed_secs(due, now));
        // The whole cost of the retries so far: from the original record to here.
        if let Some(ts) = msg.timestamp() {
            meters.e2e_original.record(elapsed_secs(ts, now));
        }
    }
}

/// `started + after`, on tokio's clock.
fn deadline_at(started: Instant, after: Duration) -> tokio::time::Instant {
    tokio::time::Instant::from_std(started) + after
}

/// A record key as shown in a log line, through the one escaping rule for bytes a person reads
/// (`crate::escape`: control characters and bytes that are not UTF-8 escaped, cut visibly), so
/// two different keys never look alike and none can forge a log line.
fn shown_key(key: Option<&[u8]>) -> String {
    match key {
        None => "none".to_owned(),
        Some(k) => crate::escape::for_terminal(k, SHOWN_KEY_CHARS),
    }
}

/// When a handler call started: read up front for sampled calls, else on first use (after the
/// call's first poll, for calls that wait).
struct LazyInstant(Option<Instant>);

impl LazyInstant {
    /// Time since the start of a sampled call (zero for a call that was not sampled).
    fn elapsed(&self) -> Duration {
        self.0.map_or(Duration::ZERO, |s| s.elapsed())
    }

    /// The start, read now if it was not read up front (a call that waits is always timed).
    fn or_now(&self) -> Instant {
        self.0.unwrap_or_else(Instant::now)
    }
}

/// Takes one back off a counter however the scope ends (the wait completes, is cancelled or
/// the future is dropped), so `waiting` never stays raised.
struct DecrementOnDrop<'a>(&'a AtomicUsize);

impl Drop for DecrementOnDrop<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How long before a retry record is due its paused partition is resumed: the retry consumer's
/// fetch long-poll (`fetch.wait.max.ms`, 100 ms unless overridden) plus room for a round trip.
fn resume_ahead(config: &Config) -> Duration {
    let fetch_wait = config
        .consumer
        .get("fetch.wait.max.ms")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(crate::runtime::client::RETRY_FETCH_WAIT_MS);
    Duration::from_millis(fetch_wait.saturating_add(200))
}

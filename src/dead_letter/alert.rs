//! Dead-letter alerts: aggregated per (source topic, group) and time window and handed to
//! [`DeadLetterNotifier`]s.
//!
//! A record is added to an alert only after the broker acknowledged it on the DLQ. Adding is
//! a short lock on the dead-letter path, never a wait; sending happens on a separate task, each
//! notifier call bounded by a timeout, so a failing or slow notifier never blocks consumption
//! and never affects the DLQ record. Failures are counted and logged.
//!
//! Windows are epoch-aligned and disjoint in DLQ-record-timestamp space: window `k` holds the
//! dead letters whose DLQ timestamp `t` has `k·W <= t < (k+1)·W` (`W` = `alerts.window`). The
//! commands an alert shows select exactly that window (`--since k·W --until (k+1)·W − 1 ms`),
//! so every instance of a group, and every follow-up alert of the window, shows the same
//! commands: one progress group, one replay. A window's alert is sent once the clock passes
//! its end plus a grace (the longest a dead letter stamped inside it can take to be
//! acknowledged); a dead letter acknowledged later still goes into a follow-up alert of the
//! same window. Everything collected is sent at shutdown.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::BreakerAlert;
use crate::escape;
use crate::metrics as m;
use crate::outcome::Reason;

/// Error text kept per example in an alert.
const EXAMPLE_ERROR_CHARS: usize = 300;
/// Key text kept per example in an alert.
const EXAMPLE_KEY_CHARS: usize = 64;

/// One dead-lettered record, as shown in an alert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetterExample {
    /// Original partition.
    pub partition: i32,
    /// Original offset.
    pub offset: i64,
    /// Partition of the record on the DLQ.
    pub dlq_partition: i32,
    /// Offset of the record on the DLQ (for `sidetrack dlq show`), `None` when the
    /// acknowledgement did not carry one (the alert's commands still find the record).
    pub dlq_offset: Option<i64>,
    /// The key, if any, escaped by [`escape::for_terminal`](crate::escape::for_terminal) (no
    /// control character, non-UTF-8 bytes as `\xNN`) and cut at 64 characters: record bytes,
    /// made safe to show as they are.
    pub key: Option<String>,
    /// Why it was dead-lettered.
    pub reason: String,
    /// Handler attempts made.
    pub attempts: u32,
    /// The error, escaped like `key` and cut at 300 characters.
    pub error: String,
    /// Trace id (32 lowercase hex digits) of the record's origin: the producer's span, as
    /// the record's `traceparent` (or, once handed off, its `sidetrack-origin-traceparent`)
    /// named it. `None` when the record carried no valid trace context. Open this trace to
    /// see the request that produced the record and every attempt.
    pub trace_id: Option<String>,
}

/// Everything on-call needs about the records dead-lettered for one (topic, group) in one
/// window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetterAlert {
    /// Consumer group.
    pub group: String,
    /// Source topic.
    pub topic: String,
    /// Dead-letter topic.
    pub dead_letter_topic: String,
    /// Records dead-lettered in the window.
    pub count: u64,
    /// Count per reason (`permanent`, `poison`, …).
    pub by_reason: Vec<(String, u64)>,
    /// DLQ timestamp of the first and last dead letter, ms since the epoch.
    pub first_at_ms: i64,
    /// See `first_at_ms`.
    pub last_at_ms: i64,
    /// The window's first millisecond (`k·W`), ms since the epoch.
    pub window_start_ms: i64,
    /// The window's last millisecond (`(k+1)·W − 1`), inclusive.
    pub window_end_ms: i64,
    /// More records of a window whose alert was already sent (acknowledged after it); the
    /// commands are the same as that alert's and cover both.
    pub follow_up: bool,
    /// The first few records.
    pub examples: Vec<DeadLetterExample>,
    /// Command that lists every record of the window (on any instance of the group). Built
    /// only from the runtime's configuration (`alerts.command`, `brokers`, the dead-letter
    /// topic's name) and the window: no record byte is ever part of it.
    pub inspect_command: String,
    /// Command that replays them (dry run; add `--yes` to send). The same on every instance
    /// and every follow-up of the window, so it derives the same progress group: running it
    /// more than once sends nothing new. Built like `inspect_command`.
    pub replay_command: String,
}

impl DeadLetterAlert {
    /// A readable, multi-line summary (the log notifier's message). Every line comes from
    /// sidetrack's own template: record-derived text (keys, errors) is escaped and cut (see
    /// [`escape`](crate::escape)), so no record can add a line, a terminal control sequence, or
    /// a second `Replay:` command.
    pub fn text(&self) -> String {
        let name = |s: &str| escape::for_terminal(s, NAME_CHARS);
        let reasons: Vec<String> = self
            .by_reason
            .iter()
            .map(|(r, n)| format!("{n} {r}"))
            .collect();
        let mut out = format!(
            "sidetrack: {}{} record{} from `{}` dead-lettered by group `{}` into `{}` ({}) in the window {} to {}{}.\n",
            self.count,
            if self.follow_up { " more" } else { "" },
            if self.count == 1 { "" } else { "s" },
            name(&self.topic),
            name(&self.group),
            name(&self.dead_letter_topic),
            reasons.join(", "),
            rfc3339_millis(self.window_start_ms),
            rfc3339_millis(self.window_end_ms),
            if self.follow_up {
                " (acknowledged after the window's alert; the same commands cover them)"
            } else {
                ""
            },
        );
        for e in &self.examples {
            out.push_str(&format!(
                "• {}[{}]@{} key={} {} after {} attempt{}: {} (DLQ {}{})\n",
                name(&self.topic),
                e.partition,
                e.offset,
                e.key.as_deref().unwrap_or("-"),
                e.reason,
                e.attempts,
                if e.attempts == 1 { "" } else { "s" },
                e.error,
                match e.dlq_offset {
                    Some(o) => format!("{}:{o}", e.dlq_partition),
                    None => format!("partition {}, offset unknown", e.dlq_partition),
                },
                // Validated lowercase hex when set (never record text), so safe as it is.
                e.trace_id
                    .as_deref()
                    .map(|t| format!(", trace {t}"))
                    .unwrap_or_default(),
            ));
        }
        if (self.examples.len() as u64) < self.count {
            out.push_str(&format!(
                "… and {} more.\n",
                self.count - self.examples.len() as u64
            ));
        }
        out.push_str(&format!(
            "Inspect: {}\nReplay:  {}",
            escape::for_terminal(&self.inspect_command, COMMAND_CHARS),
            escape::for_terminal(&self.replay_command, COMMAND_CHARS)
        ));
        out
    }

    /// [`text`](Self::text) for Slack (the webhook notifier's `text`): also Slack's markup
    /// characters `&`, `<`, `>` as entities, so a key or error cannot mention `@channel`,
    /// a user or a channel, nor show a link under a false label.
    pub fn slack_text(&self) -> String {
        escape::slack_markup(&self.text())
    }
}

/// Topic and group names shown in an alert's text (Kafka's own limit is 249).
const NAME_CHARS: usize = 255;
/// Commands shown in an alert's text (config-derived; capped all the same).
const COMMAND_CHARS: usize = 2048;

/// `s` as one shell word: as is when it holds only characters no shell treats specially,
/// else single-quoted. Escaped by the rule first, so it is one line whatever the config says.
fn shell_word(s: &str) -> String {
    let s = escape::for_terminal(s, COMMAND_CHARS);
    let plain = !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'.' | b'_' | b'-' | b':' | b',' | b'/' | b'@' | b'%' | b'+' | b'='
                )
        });
    if plain {
        s
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Last millisecond RFC 3339 can write (9999-12-31T23:59:59.999Z).
const MAX_RFC3339_MS: i64 = 253_402_300_799_999;

/// RFC 3339 with milliseconds, UTC (what `sidetrack dlq --since/--until` reads back to the
/// millisecond); clamped to 1970–9999, which a timestamp of this clock never leaves.
fn rfc3339_millis(ms: i64) -> String {
    let ms = ms.clamp(0, MAX_RFC3339_MS);
    let t = UNIX_EPOCH + Duration::from_millis(ms.unsigned_abs());
    humantime::format_rfc3339_millis(t).to_string()
}

/// Why a notifier could not deliver an alert.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NotifyError {
    /// The notifier's own failure, as text.
    #[error("{0}")]
    Failed(String),
    /// The notifier did not finish within `alerts.timeout`.
    #[error("timed out after {0:?}")]
    TimedOut(Duration),
}

/// Receives dead-letter alerts. Called only after the records are durably on the DLQ.
///
/// ```
/// use sidetrack::dead_letter::{DeadLetterAlert, DeadLetterNotifier, NotifyError};
///
/// struct Pager;
/// impl DeadLetterNotifier for Pager {
///     fn name(&self) -> &str { "pager" }
///     async fn notify(&self, alert: &DeadLetterAlert) -> Result<(), NotifyError> {
///         eprintln!("{}", alert.text());
///         Ok(())
///     }
/// }
/// ```
pub trait DeadLetterNotifier: Send + Sync + 'static {
    /// A short name for logs and the `notifier` metric label.
    /// The notifier's name, for the failure counter's `notifier` label and the log.
    fn name(&self) -> &str;
    /// Delivers one alert. It runs on its own task under a timeout.
    fn notify(
        &self,
        alert: &DeadLetterAlert,
    ) -> impl Future<Output = Result<(), NotifyError>> + Send;
    /// Delivers one dead-letter flood breaker event (see [`BreakerAlert`]) as soon as it
    /// happens (not aggregated). It runs on its own task under a timeout. The default does
    /// nothing (notifiers written before the breaker existed keep compiling): the runtime
    /// logs every breaker event itself, and [`LogNotifier`] and the webhook implement it.
    fn notify_breaker(
        &self,
        alert: &BreakerAlert,
    ) -> impl Future<Output = Result<(), NotifyError>> + Send {
        let _ = alert;
        async { Ok(()) }
    }
}

/// [`DeadLetterNotifier`] with its futures boxed, so the runtime can hold notifiers of
/// different types in one `Vec<Arc<dyn ErasedNotifier>>`. The user's trait keeps `async fn`
/// (no boxing in what they write); the one allocation per alert happens here, off the record
/// path, on the task that sends alerts. Implemented for every notifier by the blanket impl below.
pub(crate) trait ErasedNotifier: Send + Sync + 'static {
    fn name(&self) -> &str;
    /// [`DeadLetterNotifier::notify`], boxed.
    fn notify_boxed<'a>(
        &'a self,
        alert: &'a DeadLetterAlert,
    ) -> BoxFuture<'a, Result<(), NotifyError>>;
    /// [`DeadLetterNotifier::notify_breaker`], boxed.
    fn notify_breaker_boxed<'a>(
        &'a self,
        alert: &'a BreakerAlert,
    ) -> BoxFuture<'a, Result<(), NotifyError>>;
}

impl<N: DeadLetterNotifier> ErasedNotifier for N {
    fn name(&self) -> &str {
        DeadLetterNotifier::name(self)
    }
    fn notify_boxed<'a>(
        &'a self,
        alert: &'a DeadLetterAlert,
    ) -> BoxFuture<'a, Result<(), NotifyError>> {
        Box::pin(self.notify(alert))
    }
    fn notify_breaker_boxed<'a>(
        &'a self,
        alert: &'a BreakerAlert,
    ) -> BoxFuture<'a, Result<(), NotifyError>> {
        Box::pin(self.notify_breaker(alert))
    }
}

/// The default notifier: one structured `WARN` log line per alert (target
/// `sidetrack::alert`); for the dead-letter flood breaker, `ERROR` when it opens and `WARN`
/// when it closes.
#[derive(Debug, Default, Clone)]
pub struct LogNotifier;

impl DeadLetterNotifier for LogNotifier {
    fn name(&self) -> &str {
        "log"
    }
    async fn notify(&self, alert: &DeadLetterAlert) -> Result<(), NotifyError> {
        tracing::warn!(
            target: "sidetrack::alert",
            group = %alert.group,
            topic = %alert.topic,
            dlq = %alert.dead_letter_topic,
            count = alert.count,
            "{}",
            alert.text()
        );
        Ok(())
    }
    async fn notify_breaker(&self, alert: &BreakerAlert) -> Result<(), NotifyError> {
        use super::BreakerTransition as T;
        let (group, topic, transition) = (&alert.group, &alert.topic, alert.transition.as_str());
        match alert.transition {
            T::Opened | T::Reopened => tracing::error!(
                target: "sidetrack::alert", %group, %topic, partition = alert.partition,
                transition, "{}", alert.text()
            ),
            _ => tracing::warn!(
                target: "sidetrack::alert", %group, %topic, partition = alert.partition,
                transition, "{}", alert.text()
            ),
        }
        Ok(())
    }
}

/// The dead letters of one (source topic, dead-letter topic, window) collected so far: what
/// its alert will say. Counts are exact; examples stop at `alerts.max_examples`, so a flood
/// costs a counter increment per record, not memory.
struct Bucket {
    /// Dead letters in the bucket.
    count: u64,
    /// The count per [`Reason`] (a handful of keys: `Reason` is a closed set).
    by_reason: HashMap<Reason, u64>,
    /// Earliest DLQ timestamp seen (ms since the epoch).
    first_at_ms: i64,
    /// Latest DLQ timestamp seen.
    last_at_ms: i64,
    /// Local clock when the bucket was opened: bounds how long a bucket whose DLQ timestamps
    /// lie in the future (a broker clock ahead of ours) is held.
    opened_ms: i64,
    /// True when an alert for this window was already sent: this one says it is a follow-up,
    /// so a reader does not add the counts twice.
    follow_up: bool,
    /// The first few dead letters, escaped for a terminal when they were taken.
    examples: Vec<DeadLetterExample>,
}

/// (source topic, dead-letter topic, window index).
type BucketKey = (String, String, i64);

/// Everything behind the one lock of [`Alerts`]: buckets waiting and what was sent.
#[derive(Default)]
struct State {
    /// Open buckets; a `BTreeMap` so that shutdown sends them in a stable order (the test
    /// reads them back).
    buckets: BTreeMap<BucketKey, Bucket>,
    /// Highest window already sent per (source topic, dead-letter topic): a dead letter of that
    /// window or an earlier one goes into a follow-up alert.
    flushed: HashMap<(String, String), i64>,
}

/// The window a DLQ timestamp falls in: `k` with `k·W <= t < (k+1)·W` (any `t`, negative
/// included; `window_ms` below 1 counts as 1).
pub(crate) fn window_of(t_ms: i64, window_ms: i64) -> i64 {
    t_ms.div_euclid(window_ms.max(1))
}

/// First and last millisecond (inclusive) of window `k`, saturating at the ends of `i64`.
pub(crate) fn window_bounds(k: i64, window_ms: i64) -> (i64, i64) {
    let w = window_ms.max(1);
    let start = k.saturating_mul(w);
    (start, start.saturating_add(w - 1))
}

/// Whether window `k`'s bucket is sent at `now_ms`: once the clock passes the window's end plus
/// `grace_ms` (a dead letter stamped inside the window is acknowledged by then), or, for a
/// bucket of a window ahead of this clock, once it was held a window plus the grace.
pub(crate) fn is_due(k: i64, window_ms: i64, grace_ms: i64, opened_ms: i64, now_ms: i64) -> bool {
    let (_, last) = window_bounds(k, window_ms);
    let end = last.saturating_add(1).saturating_add(grace_ms);
    let held = opened_ms
        .saturating_add(window_ms.max(1))
        .saturating_add(grace_ms);
    now_ms >= end.min(held)
}

/// Collects dead letters and sends one alert per (topic, group) and window.
pub(crate) struct Alerts {
    /// Buckets and flush marks. A `std` mutex held for a map update only, never across an
    /// `.await`: adding a dead letter never waits on a notifier.
    state: Mutex<State>,
    /// The configured notifiers; empty means alerts are off and recording is a no-op.
    notifiers: Vec<Arc<dyn ErasedNotifier>>,
    /// `alerts.max_examples`: examples kept per bucket.
    max_examples: usize,
    /// `alerts.timeout`: the bound on each notifier call.
    timeout: Duration,
    /// `alerts.window` in ms, at least 1.
    window_ms: i64,
    /// How long after a window's end its alert waits for late acknowledgements.
    grace_ms: i64,
    /// The bootstrap servers, written into the commands an alert shows.
    brokers: String,
    /// `alerts.command`: how on-call runs the CLI (`sidetrack` by default).
    cli: String,
}

/// What the runtime knows about one durable dead letter.
pub(crate) struct DeadLetterEvent<'a> {
    /// Source topic the record was consumed from (the alert's subject).
    pub(crate) topic: &'a str,
    /// Dead-letter topic it now sits in.
    pub(crate) dlq: &'a str,
    /// Source partition and offset (for the example).
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    /// Where it landed on the DLQ: what `dlq show` takes.
    pub(crate) dlq_partition: i32,
    /// Negative when the acknowledgement carried no offset (librdkafka's -1001).
    pub(crate) dlq_offset: i64,
    /// Timestamp of the DLQ record: it decides the window, since the CLI filters on it.
    /// `None` falls back to this clock.
    pub(crate) dlq_timestamp: Option<i64>,
    /// The record's key, escaped and cut when kept as an example.
    pub(crate) key: Option<&'a [u8]>,
    /// Why it was dead-lettered.
    pub(crate) reason: Reason,
    /// Handler calls it had.
    pub(crate) attempts: u32,
    /// The last error's text, escaped and cut when kept as an example.
    pub(crate) error: &'a str,
    /// The origin's trace id, if the record carried a trace context (validated hex).
    pub(crate) trace_id: Option<&'a str>,
}

/// `d` in whole milliseconds, saturating (a config duration may exceed `i64` ms).
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Alerts {
    /// `window` is `alerts.window`; `grace` how long after a window's end its alert waits for
    /// dead letters stamped inside it to be acknowledged (the hand-off timeout plus a second).
    pub(crate) fn new(
        notifiers: Vec<Arc<dyn ErasedNotifier>>,
        max_examples: usize,
        timeout: Duration,
        window: Duration,
        grace: Duration,
        brokers: String,
        cli: String,
    ) -> Self {
        Alerts {
            state: Mutex::new(State::default()),
            notifiers,
            max_examples,
            timeout,
            window_ms: millis(window).max(1),
            grace_ms: millis(grace),
            brokers,
            cli,
        }
    }

    /// Records one dead letter; never waits on a notifier.
    pub(crate) fn record(&self, event: DeadLetterEvent<'_>) {
        self.record_at(event, now_ms());
    }

    /// [`Alerts::record`] at a given clock, for tests. The window is that of the DLQ timestamp
    /// (what the CLI's `--since`/`--until` filter on), falling back to `now`; a window already
    /// sent gets a new bucket marked as a follow-up.
    fn record_at(&self, event: DeadLetterEvent<'_>, now: i64) {
        if self.notifiers.is_empty() {
            return;
        }
        let at = event.dlq_timestamp.unwrap_or(now);
        let k = window_of(at, self.window_ms);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let follow_up = state
            .flushed
            .get(&(event.topic.to_owned(), event.dlq.to_owned()))
            .is_some_and(|f| *f >= k);
        let b = state
            .buckets
            .entry((event.topic.to_owned(), event.dlq.to_owned(), k))
            .or_insert_with(|| Bucket {
                count: 0,
                by_reason: HashMap::new(),
                first_at_ms: at,
                last_at_ms: at,
                opened_ms: now,
                follow_up,
                examples: Vec::new(),
            });
        b.count += 1;
        b.first_at_ms = b.first_at_ms.min(at);
        b.last_at_ms = b.last_at_ms.max(at);
        *b.by_reason.entry(event.reason).or_default() += 1;
        if b.examples.len() < self.max_examples {
            b.examples.push(DeadLetterExample {
                partition: event.partition,
                offset: event.offset,
                dlq_partition: event.dlq_partition,
                dlq_offset: (event.dlq_offset >= 0).then_some(event.dlq_offset),
                key: event
                    .key
                    .map(|k| escape::for_terminal(k, EXAMPLE_KEY_CHARS)),
                reason: event.reason.as_str().to_owned(),
                attempts: event.attempts,
                error: escape::for_terminal(event.error, EXAMPLE_ERROR_CHARS),
                trace_id: event.trace_id.map(str::to_owned),
            });
        }
    }

    /// The alerts of the buckets due at `now` (every bucket with `None`, at shutdown), in
    /// window then topic order.
    fn take(&self, group: &str, now: Option<i64>) -> Vec<DeadLetterAlert> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let due: Vec<BucketKey> = state
            .buckets
            .iter()
            .filter(|((_, _, k), b)| {
                now.is_none_or(|now| is_due(*k, self.window_ms, self.grace_ms, b.opened_ms, now))
            })
            .map(|(key, _)| key.clone())
            .collect();
        let mut alerts = Vec::with_capacity(due.len());
        for key in due {
            let Some(b) = state.buckets.remove(&key) else {
                continue;
            };
            let (topic, dlq, k) = key;
            let flushed = state
                .flushed
                .entry((topic.clone(), dlq.clone()))
                .or_insert(k);
            *flushed = (*flushed).max(k);
            alerts.push(self.alert(group, topic, dlq, k, b));
        }
        alerts.sort_by(|a, b| (a.window_start_ms, &a.topic).cmp(&(b.window_start_ms, &b.topic)));
        alerts
    }

    /// Turns one due bucket into its alert: counts by reason (in name order), examples, and the
    /// `dlq list` and `dlq replay --dry-run` commands for exactly that window, built from the
    /// configuration only (names shell-quoted, the command escaped), so every instance writes the
    /// same commands and a pasted replay uses one progress group.
    fn alert(&self, group: &str, topic: String, dlq: String, k: i64, b: Bucket) -> DeadLetterAlert {
        let (start, end) = window_bounds(k, self.window_ms);
        // From the configuration and the window only. `alerts.command` may be several words
        // (`docker run … sidetrack`): kept as written, on one line.
        let command = |verb: &str| {
            format!(
                "{} dlq {verb} --brokers {} --topic {} --since {} --until {}",
                escape::for_terminal(&self.cli, COMMAND_CHARS),
                shell_word(&self.brokers),
                shell_word(&dlq),
                rfc3339_millis(start),
                rfc3339_millis(end)
            )
        };
        let inspect_command = command("list");
        let replay_command = format!("{} --dry-run", command("replay"));
        let mut by_reason: Vec<(String, u64)> = b
            .by_reason
            .into_iter()
            .map(|(r, n)| (r.as_str().to_owned(), n))
            .collect();
        by_reason.sort();
        DeadLetterAlert {
            group: group.to_owned(),
            topic,
            dead_letter_topic: dlq,
            count: b.count,
            by_reason,
            first_at_ms: b.first_at_ms,
            last_at_ms: b.last_at_ms,
            window_start_ms: start,
            window_end_ms: end,
            follow_up: b.follow_up,
            examples: b.examples,
            inspect_command,
            replay_command,
        }
    }

    /// Sends the alerts due at `now` (all with `None`), each notifier call on its own task with
    /// a timeout. Returns the tasks so shutdown can wait for the last flush.
    fn flush(self: &Arc<Self>, group: &str, now: Option<i64>) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        for alert in self.take(group, now) {
            let alert = Arc::new(alert);
            for n in &self.notifiers {
                let (n, alert, timeout) = (Arc::clone(n), Arc::clone(&alert), self.timeout);
                tasks.push(tokio::spawn(async move {
                    let name = n.name().to_owned();
                    let result = match tokio::time::timeout(timeout, n.notify_boxed(&alert)).await {
                        Ok(r) => r,
                        Err(_) => Err(NotifyError::TimedOut(timeout)),
                    };
                    match result {
                        Ok(()) => metrics::counter!(m::ALERTS_SENT, "notifier" => name).increment(1),
                        Err(e) => {
                            metrics::counter!(m::ALERT_FAILURES, "notifier" => name.clone()).increment(1);
                            tracing::warn!(notifier = %name, topic = %alert.topic, count = alert.count, error = %e,
                                "dead-letter alert not delivered (the records are safe on the DLQ)");
                        }
                    }
                }));
            }
        }
        tasks
    }

    /// Sends a breaker event to every notifier at once, each call on its own task with a
    /// timeout; never waits.
    pub(crate) fn breaker(&self, alert: BreakerAlert) {
        let alert = Arc::new(alert);
        for n in &self.notifiers {
            let (n, alert, timeout) = (Arc::clone(n), Arc::clone(&alert), self.timeout);
            tokio::spawn(async move {
                let name = n.name().to_owned();
                let result =
                    match tokio::time::timeout(timeout, n.notify_breaker_boxed(&alert)).await {
                        Ok(r) => r,
                        Err(_) => Err(NotifyError::TimedOut(timeout)),
                    };
                match result {
                    Ok(()) => metrics::counter!(m::ALERTS_SENT, "notifier" => name).increment(1),
                    Err(e) => {
                        metrics::counter!(m::ALERT_FAILURES, "notifier" => name.clone())
                            .increment(1);
                        tracing::warn!(notifier = %name, topic = %alert.topic, partition = alert.partition,
                            transition = alert.transition.as_str(), error = %e,
                            "dead-letter breaker alert not delivered");
                    }
                }
            });
        }
    }

    /// Sends each window's alert once it is due, until `stop`; then everything collected,
    /// waiting at most `timeout` for that last flush.
    pub(crate) async fn run(self: Arc<Self>, group: String, stop: CancellationToken) {
        if self.notifiers.is_empty() {
            return;
        }
        // Due times are checked this often: an alert is sent at most this late.
        let every = Duration::from_millis(u64::try_from(self.window_ms / 4).unwrap_or(1))
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => { self.flush(&group, Some(now_ms())); }
                _ = stop.cancelled() => break,
            }
        }
        let last = self.flush(&group, None);
        let _ = tokio::time::timeout(self.timeout, futures_util::future::join_all(last)).await;
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(millis)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: i64 = 60_000;
    /// 2023-11-14T22:13:00.000Z, a window boundary for W = 1 min.
    const T0: i64 = 1_699_999_980_000;

    fn event(offset: i64, reason: Reason, at: i64) -> DeadLetterEvent<'static> {
        DeadLetterEvent {
            topic: "orders",
            dlq: "orders.billing.dlq",
            partition: 1,
            offset,
            dlq_partition: 1,
            dlq_offset: offset + 100,
            dlq_timestamp: Some(at),
            key: Some(b"customer-7"),
            reason,
            attempts: 3,
            error: "payment service down",
            trace_id: None,
        }
    }

    #[test]
    fn the_origin_trace_id_is_printed_with_its_example() {
        let a = alerts(5);
        a.record_at(
            DeadLetterEvent {
                trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736"),
                ..event(7, Reason::Exhausted, T0 + 1)
            },
            T0 + 1,
        );
        let all = a.take("billing", None);
        assert_eq!(
            all[0].examples[0].trace_id.as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert!(all[0]
            .text()
            .contains("(DLQ 1:107, trace 4bf92f3577b34da6a3ce929d0e0e4736)"));
        let json = serde_json::to_value(&all[0]).unwrap();
        assert_eq!(
            json["examples"][0]["trace_id"],
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }

    fn alerts(max_examples: usize) -> Alerts {
        Alerts::new(
            vec![Arc::new(LogNotifier)],
            max_examples,
            Duration::from_secs(1),
            Duration::from_millis(W as u64),
            Duration::from_secs(11),
            "k:9092".into(),
            "sidetrack".into(),
        )
    }

    #[test]
    fn windows_are_epoch_aligned_and_disjoint() {
        assert_eq!(window_of(T0, W), T0 / W);
        assert_eq!(window_of(T0 + W - 1, W), T0 / W);
        assert_eq!(window_of(T0 + W, W), T0 / W + 1);
        assert_eq!(window_of(T0 - 1, W), T0 / W - 1);
        assert_eq!(window_bounds(T0 / W, W), (T0, T0 + W - 1));
        // Consecutive windows touch without overlapping, to the millisecond.
        let (_, end) = window_bounds(7, W);
        let (next, _) = window_bounds(8, W);
        assert_eq!(next, end + 1);
        // Any timestamp, any window: no overflow, no panic.
        assert_eq!(window_of(-1, W), -1);
        assert_eq!(window_of(i64::MIN, W), i64::MIN.div_euclid(W));
        assert_eq!(window_of(5, 0), 5, "a zero window counts as 1 ms");
        assert_eq!(window_bounds(i64::MAX, W), (i64::MAX, i64::MAX));
        assert_eq!(window_bounds(i64::MIN, W).0, i64::MIN);
    }

    #[test]
    fn a_window_is_due_once_its_end_plus_the_grace_has_passed() {
        let k = T0 / W;
        let grace = 11_000;
        let opened = T0 + 10;
        assert!(!is_due(k, W, grace, opened, T0 + W - 1));
        assert!(!is_due(k, W, grace, opened, T0 + W + grace - 1));
        assert!(is_due(k, W, grace, opened, T0 + W + grace));
        // A window ahead of this clock (a broker clock ahead of ours) is not held forever.
        let ahead = k + 1_000;
        assert!(!is_due(ahead, W, grace, opened, opened + W + grace - 1));
        assert!(is_due(ahead, W, grace, opened, opened + W + grace));
        // Extremes saturate.
        assert!(!is_due(i64::MAX / W, W, i64::MAX, i64::MAX, 0));
        assert!(is_due(i64::MIN / W, W, grace, 0, 0));
    }

    #[test]
    fn aggregates_per_window_with_bounded_examples_and_commands() {
        let alerts = alerts(2);
        alerts.record_at(event(1, Reason::Exhausted, T0 + 1), T0 + 5);
        alerts.record_at(event(2, Reason::Exhausted, T0 + 2), T0 + 5);
        alerts.record_at(event(3, Reason::Poison, T0 + 3), T0 + 5);
        assert!(
            alerts.take("billing", Some(T0 + W)).is_empty(),
            "not before the window's end plus the grace"
        );
        let out = alerts.take("billing", Some(T0 + W + 11_000));
        assert_eq!(out.len(), 1);
        let a = &out[0];
        assert_eq!(a.count, 3);
        assert!(!a.follow_up);
        // The time range comes from the DLQ records' own timestamps (what the CLI filters on).
        assert_eq!((a.first_at_ms, a.last_at_ms), (T0 + 1, T0 + 3));
        assert_eq!((a.window_start_ms, a.window_end_ms), (T0, T0 + W - 1));
        assert_eq!(a.examples.len(), 2);
        assert_eq!(a.examples[0].dlq_offset, Some(101));
        assert_eq!(
            a.by_reason,
            vec![("exhausted".to_string(), 2), ("poison".to_string(), 1)]
        );
        assert_eq!(
            a.inspect_command,
            "sidetrack dlq list --brokers k:9092 --topic orders.billing.dlq \
             --since 2023-11-14T22:13:00.000Z --until 2023-11-14T22:13:59.999Z"
        );
        assert_eq!(
            a.replay_command,
            "sidetrack dlq replay --brokers k:9092 --topic orders.billing.dlq \
             --since 2023-11-14T22:13:00.000Z --until 2023-11-14T22:13:59.999Z --dry-run"
        );
        let text = a.text();
        assert!(text.contains("3 records from `orders`"), "{text}");
        assert!(
            text.contains("in the window 2023-11-14T22:13:00.000Z to 2023-11-14T22:13:59.999Z"),
            "{text}"
        );
        assert!(
            text.contains("orders[1]@1 key=customer-7 exhausted after 3 attempts"),
            "{text}"
        );
        assert!(text.contains("(DLQ 1:101)"), "{text}");
        assert!(text.contains("… and 1 more."), "{text}");
        assert!(alerts.take("billing", None).is_empty(), "sent once");
    }

    #[test]
    fn records_split_at_window_boundaries_and_each_window_has_its_own_commands() {
        let alerts = alerts(5);
        // The last millisecond of one window and the first of the next.
        alerts.record_at(event(1, Reason::Permanent, T0 + W - 1), T0 + W);
        alerts.record_at(event(2, Reason::Permanent, T0 + W), T0 + W);
        let now = T0 + W + 11_000;
        let first = alerts.take("billing", Some(now));
        assert_eq!(first.len(), 1, "the second window is not over");
        assert_eq!(first[0].count, 1);
        assert!(first[0]
            .inspect_command
            .ends_with("--until 2023-11-14T22:13:59.999Z"));
        let second = alerts.take("billing", Some(now + W));
        assert_eq!(second.len(), 1);
        assert!(second[0]
            .inspect_command
            .contains("--since 2023-11-14T22:14:00.000Z --until 2023-11-14T22:14:59.999Z"));
    }

    #[test]
    fn instances_of_a_group_show_identical_commands_for_a_window() {
        // Two instances see different records of the same window at different times.
        let (a, b) = (alerts(5), alerts(5));
        a.record_at(event(1, Reason::Permanent, T0 + 10), T0 + 10);
        b.record_at(event(2, Reason::Poison, T0 + 59_000), T0 + 59_500);
        let now = T0 + W + 11_000;
        let (x, y) = (a.take("billing", Some(now)), b.take("billing", Some(now)));
        assert_eq!(x[0].replay_command, y[0].replay_command);
        assert_eq!(x[0].inspect_command, y[0].inspect_command);
    }

    #[test]
    fn a_late_acknowledgement_goes_into_a_follow_up_with_the_same_commands() {
        let alerts = alerts(5);
        alerts.record_at(event(1, Reason::Permanent, T0 + 5), T0 + 5);
        let sent = alerts.take("billing", Some(T0 + W + 11_000));
        assert_eq!(sent.len(), 1);
        // Stamped inside the window, acknowledged after its alert went out.
        alerts.record_at(event(2, Reason::Permanent, T0 + W - 2), T0 + W + 12_000);
        let late = alerts.take("billing", Some(T0 + W + 12_000));
        assert_eq!(late.len(), 1, "due at once: its window is long over");
        assert!(late[0].follow_up);
        assert_eq!(late[0].count, 1);
        assert_eq!(late[0].replay_command, sent[0].replay_command);
        assert!(
            late[0].text().contains("1 more record from"),
            "{}",
            late[0].text()
        );
        // A later window is not a follow-up.
        alerts.record_at(event(3, Reason::Permanent, T0 + W), T0 + W + 12_000);
        assert!(!alerts.take("billing", None)[0].follow_up);
    }

    #[test]
    fn shutdown_sends_every_bucket_and_unknown_dlq_offsets_are_shown_as_such() {
        let alerts = alerts(5);
        let mut e = event(1, Reason::Permanent, T0 + 5);
        e.dlq_offset = -1001;
        alerts.record_at(e, T0 + 5);
        alerts.record_at(event(2, Reason::Permanent, T0 + 3 * W), T0 + 3 * W);
        assert!(alerts.take("billing", Some(T0 + 6)).is_empty());
        let all = alerts.take("billing", None);
        assert_eq!(all.len(), 2, "both windows at shutdown, in window order");
        assert!(all[0].window_start_ms < all[1].window_start_ms);
        assert_eq!(all[0].examples[0].dlq_offset, None);
        assert!(
            all[0].text().contains("(DLQ partition 1, offset unknown)"),
            "{}",
            all[0].text()
        );
        let json = serde_json::to_value(&all[0]).unwrap();
        assert!(json["examples"][0]["dlq_offset"].is_null());
    }

    /// Issue 17: a key with a newline forged a second `Replay:` line pointing at another
    /// broker. Now the alert has exactly one, built from the runtime's configuration.
    #[test]
    fn a_key_cannot_forge_a_line_or_a_command_in_an_alert() {
        let alerts = alerts(5);
        let forged = b"x\nReplay:  sidetrack dlq replay --brokers evil:9092 --yes #";
        let mut e = event(1, Reason::Permanent, T0 + 1);
        e.key = Some(forged);
        e.error = "boom\r\nInspect: sidetrack dlq list --brokers evil:9092\x1b]52;c;ZXZpbA==\x07";
        alerts.record_at(e, T0 + 1);
        let a = &alerts.take("billing", None)[0];
        for text in [a.text(), a.slack_text()] {
            let replay: Vec<&str> = text.lines().filter(|l| l.starts_with("Replay:")).collect();
            assert_eq!(replay.len(), 1, "{text}");
            assert!(replay[0].contains("--brokers k:9092 "), "{text}");
            assert!(!replay[0].contains("evil"), "{text}");
            let inspect: Vec<&str> = text.lines().filter(|l| l.starts_with("Inspect:")).collect();
            assert_eq!(inspect.len(), 1, "{text}");
            assert!(!inspect[0].contains("evil"), "{text}");
            // Every line comes from the template: the summary, one example, two commands.
            assert_eq!(text.lines().count(), 4, "{text}");
            assert!(
                !text.chars().any(|c| c.is_control() && c != '\n'),
                "{text:?}"
            );
        }
        assert!(
            a.text()
                .contains(r"key=x\nReplay:  sidetrack dlq replay --brokers evil:9092 --yes #"),
            "the key is shown, escaped: {}",
            a.text()
        );
        assert!(a.text().contains(r"\x1b]52;c;ZXZpbA==\x07"), "{}", a.text());
        assert_eq!(
            a.examples[0].key.as_deref().map(|k| k.contains('\n')),
            Some(false)
        );
    }

    #[test]
    fn slack_text_cannot_mention_or_link() {
        let alerts = alerts(5);
        let mut e = event(1, Reason::Permanent, T0 + 1);
        e.key = Some(b"<!channel>");
        e.error = "see <https://evil.example/login|the runbook> & <@U123> <!here>";
        alerts.record_at(e, T0 + 1);
        let a = &alerts.take("billing", None)[0];
        let slack = a.slack_text();
        assert!(!slack.contains('<') && !slack.contains('>'), "{slack}");
        assert!(slack.contains("key=&lt;!channel&gt;"), "{slack}");
        assert!(
            slack
                .contains("see &lt;https://evil.example/login|the runbook&gt; &amp; &lt;@U123&gt;"),
            "{slack}"
        );
    }

    #[test]
    fn long_and_non_utf8_keys_and_errors_are_capped_and_escaped() {
        let alerts = alerts(5);
        let key = [b"k\xff\xfe".as_slice(), &[b'a'; 5000]].concat();
        let error = "e".repeat(100_000);
        let mut e: DeadLetterEvent<'_> = event(1, Reason::Permanent, T0 + 1);
        e.key = Some(&key);
        e.error = &error;
        alerts.record_at(e, T0 + 1);
        let a = &alerts.take("billing", None)[0];
        let ex = &a.examples[0];
        let k = ex.key.as_deref().unwrap();
        assert!(k.starts_with(r"k\xff\xfeaaa"), "{k}");
        assert!(
            k.ends_with(&format!("…[{} more bytes]", key.len() - 3 - 55)),
            "{k}"
        );
        assert!(ex
            .error
            .ends_with(&format!("…[{} more bytes]", 100_000 - 300)));
        assert!(a.text().len() < 2_000, "bounded: {}", a.text().len());
    }

    #[test]
    fn commands_quote_config_values_a_shell_would_split() {
        let alerts = Alerts::new(
            vec![Arc::new(LogNotifier)],
            1,
            Duration::from_secs(1),
            Duration::from_millis(W as u64),
            Duration::from_secs(11),
            "a:9092, b:9092 {}".into(),
            "sidetrack".into(),
        );
        alerts.record_at(event(1, Reason::Permanent, T0 + 1), T0 + 1);
        let a = &alerts.take("billing", None)[0];
        assert!(
            a.replay_command.starts_with(
                "sidetrack dlq replay --brokers 'a:9092, b:9092 {}' --topic orders.billing.dlq "
            ),
            "{}",
            a.replay_command
        );
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word(""), "''");
    }
}

//! Dead-letter alerts: aggregated per (source topic, group) over a window and handed to
//! [`DeadLetterNotifier`]s.
//!
//! A record is added to an alert only after the broker acknowledged it on the DLQ. Adding is
//! a short lock on the dead-letter path, never a wait; sending happens on a separate task, each
//! notifier call bounded by a timeout, so a failing or slow notifier never blocks consumption
//! and never affects the DLQ record. Failures are counted and logged.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::DeadLetterReason;
use crate::metrics as m;

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
    /// Offset of the record on the DLQ (for `sidetrack dlq show`).
    pub dlq_offset: i64,
    /// Key as text (lossy UTF-8, shortened), if any.
    pub key: Option<String>,
    /// Why it was dead-lettered.
    pub reason: String,
    /// Handler attempts made.
    pub attempts: u32,
    /// The error (shortened).
    pub error: String,
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
    /// Time of the first and last dead letter, ms since the epoch.
    pub first_at_ms: i64,
    /// See `first_at_ms`.
    pub last_at_ms: i64,
    /// The first few records.
    pub examples: Vec<DeadLetterExample>,
    /// Command that lists exactly these records.
    pub inspect_command: String,
    /// Command that replays them (dry run; add `--yes` to send).
    pub replay_command: String,
}

impl DeadLetterAlert {
    /// A readable, multi-line summary (the Slack `text` of the webhook notifier).
    pub fn text(&self) -> String {
        let reasons: Vec<String> = self
            .by_reason
            .iter()
            .map(|(r, n)| format!("{n} {r}"))
            .collect();
        let mut out = format!(
            "sidetrack: {} record{} from `{}` dead-lettered by group `{}` into `{}` ({}) between {} and {}.\n",
            self.count,
            if self.count == 1 { "" } else { "s" },
            self.topic,
            self.group,
            self.dead_letter_topic,
            reasons.join(", "),
            rfc3339(self.first_at_ms),
            rfc3339(self.last_at_ms),
        );
        for e in &self.examples {
            out.push_str(&format!(
                "• {}[{}]@{} key={} {} after {} attempt{}: {} (DLQ {}:{})\n",
                self.topic,
                e.partition,
                e.offset,
                e.key.as_deref().unwrap_or("-"),
                e.reason,
                e.attempts,
                if e.attempts == 1 { "" } else { "s" },
                e.error,
                e.dlq_partition,
                e.dlq_offset,
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
            self.inspect_command, self.replay_command
        ));
        out
    }
}

fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
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
    fn name(&self) -> &str;
    /// Delivers one alert. It runs on its own task under a timeout.
    fn notify(
        &self,
        alert: &DeadLetterAlert,
    ) -> impl Future<Output = Result<(), NotifyError>> + Send;
}

pub(crate) trait ErasedNotifier: Send + Sync + 'static {
    fn name(&self) -> &str;
    fn notify_boxed<'a>(
        &'a self,
        alert: &'a DeadLetterAlert,
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
}

/// The default notifier: one structured `WARN` log line per alert (target
/// `sidetrack::alert`).
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
}

#[derive(Default)]
struct Bucket {
    count: u64,
    by_reason: HashMap<DeadLetterReason, u64>,
    first_at_ms: i64,
    last_at_ms: i64,
    examples: Vec<DeadLetterExample>,
}

/// Collects dead letters and sends one alert per (topic, group) and window.
pub(crate) struct Alerts {
    buckets: Mutex<HashMap<(String, String), Bucket>>,
    notifiers: Vec<Arc<dyn ErasedNotifier>>,
    max_examples: usize,
    timeout: Duration,
    brokers: String,
    cli: String,
}

/// What the runtime knows about one durable dead letter.
pub(crate) struct DeadLetterEvent<'a> {
    pub(crate) topic: &'a str,
    pub(crate) dlq: &'a str,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) dlq_partition: i32,
    pub(crate) dlq_offset: i64,
    /// Timestamp of the DLQ record: the alert's time range must cover it, since the CLI
    /// filters on it.
    pub(crate) dlq_timestamp: Option<i64>,
    pub(crate) key: Option<&'a [u8]>,
    pub(crate) reason: DeadLetterReason,
    pub(crate) attempts: u32,
    pub(crate) error: &'a str,
}

impl Alerts {
    pub(crate) fn new(
        notifiers: Vec<Arc<dyn ErasedNotifier>>,
        max_examples: usize,
        timeout: Duration,
        brokers: String,
        cli: String,
    ) -> Self {
        Alerts {
            buckets: Mutex::new(HashMap::new()),
            notifiers,
            max_examples,
            timeout,
            brokers,
            cli,
        }
    }

    /// Records one dead letter; never waits on a notifier.
    pub(crate) fn record(&self, event: DeadLetterEvent<'_>) {
        if self.notifiers.is_empty() {
            return;
        }
        let at = event.dlq_timestamp.unwrap_or_else(now_ms);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let b = buckets
            .entry((event.topic.to_owned(), event.dlq.to_owned()))
            .or_default();
        if b.count == 0 || at < b.first_at_ms {
            b.first_at_ms = at;
        }
        b.count += 1;
        b.last_at_ms = b.last_at_ms.max(at);
        *b.by_reason.entry(event.reason).or_default() += 1;
        if b.examples.len() < self.max_examples {
            b.examples.push(DeadLetterExample {
                partition: event.partition,
                offset: event.offset,
                dlq_partition: event.dlq_partition,
                dlq_offset: event.dlq_offset,
                key: event
                    .key
                    .map(|k| shorten(&String::from_utf8_lossy(k), EXAMPLE_KEY_CHARS)),
                reason: event.reason.as_str().to_owned(),
                attempts: event.attempts,
                error: shorten(event.error, EXAMPLE_ERROR_CHARS),
            });
        }
    }

    fn take(&self, group: &str) -> Vec<DeadLetterAlert> {
        let buckets = std::mem::take(&mut *self.buckets.lock().unwrap_or_else(|e| e.into_inner()));
        let mut alerts: Vec<DeadLetterAlert> = buckets
            .into_iter()
            .map(|((topic, dlq), b)| {
                let since = rfc3339(b.first_at_ms);
                let until = rfc3339(b.last_at_ms + 1000);
                let base = format!(
                    "{} dlq {{}} --brokers {} --topic {} --since {} --until {}",
                    self.cli, self.brokers, dlq, since, until
                );
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
                    examples: b.examples,
                    inspect_command: base.replace("{}", "list"),
                    replay_command: format!("{} --dry-run", base.replace("{}", "replay")),
                }
            })
            .collect();
        alerts.sort_by(|a, b| a.topic.cmp(&b.topic));
        alerts
    }

    /// Sends what was collected, each notifier call on its own task with a timeout. Returns
    /// the tasks so shutdown can wait for the last flush.
    fn flush(self: &Arc<Self>, group: &str) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        for alert in self.take(group) {
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

    /// Flushes every `window` until `stop`, then once more, waiting at most `timeout` for
    /// that last flush.
    pub(crate) async fn run(
        self: Arc<Self>,
        group: String,
        window: Duration,
        stop: CancellationToken,
    ) {
        if self.notifiers.is_empty() {
            return;
        }
        let mut tick = tokio::time::interval(window);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => { self.flush(&group); }
                _ = stop.cancelled() => break,
            }
        }
        let last = self.flush(&group);
        let _ = tokio::time::timeout(self.timeout, futures_util::future::join_all(last)).await;
    }
}

fn shorten(s: &str, max_chars: usize) -> String {
    let mut out: String = s.chars().take(max_chars).collect();
    if s.chars().nth(max_chars).is_some() {
        out.push('…');
    }
    out
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(offset: i64, reason: DeadLetterReason) -> DeadLetterEvent<'static> {
        DeadLetterEvent {
            topic: "orders",
            dlq: "orders.billing.dlq",
            partition: 1,
            offset,
            dlq_partition: 1,
            dlq_offset: offset + 100,
            dlq_timestamp: Some(1_700_000_000_000 + offset),
            key: Some(b"customer-7"),
            reason,
            attempts: 3,
            error: "payment service down",
        }
    }

    #[test]
    fn aggregates_per_topic_with_bounded_examples_and_commands() {
        let alerts = Alerts::new(
            vec![Arc::new(LogNotifier)],
            2,
            Duration::from_secs(1),
            "k:9092".into(),
            "sidetrack".into(),
        );
        alerts.record(event(1, DeadLetterReason::Exhausted));
        alerts.record(event(2, DeadLetterReason::Exhausted));
        alerts.record(event(3, DeadLetterReason::Poison));
        let out = alerts.take("billing");
        assert_eq!(out.len(), 1);
        let a = &out[0];
        assert_eq!(a.count, 3);
        // The time range comes from the DLQ records' own timestamps (what the CLI filters on).
        assert_eq!(
            (a.first_at_ms, a.last_at_ms),
            (1_700_000_000_001, 1_700_000_000_003)
        );
        assert_eq!(a.examples.len(), 2);
        assert_eq!(
            a.by_reason,
            vec![("exhausted".to_string(), 2), ("poison".to_string(), 1)]
        );
        assert!(a.inspect_command.starts_with(
            "sidetrack dlq list --brokers k:9092 --topic orders.billing.dlq --since "
        ));
        assert!(a.replay_command.starts_with("sidetrack dlq replay "));
        assert!(a.replay_command.ends_with("--dry-run"));
        let text = a.text();
        assert!(text.contains("3 records from `orders`"), "{text}");
        assert!(
            text.contains("orders[1]@1 key=customer-7 exhausted after 3 attempts"),
            "{text}"
        );
        assert!(text.contains("… and 1 more."), "{text}");
        assert!(alerts.take("billing").is_empty(), "a window starts empty");
    }

    #[test]
    fn shorten_marks_cuts() {
        assert_eq!(shorten("abc", 5), "abc");
        assert_eq!(shorten("abcdef", 3), "abc…");
    }
}

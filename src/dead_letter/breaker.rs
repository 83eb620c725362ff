//! Alerts of the dead-letter flood breaker (see [`crate::config::BreakerConfig`]): one when a
//! partition's breaker opens, opens again after a failed probe, or closes.
//!
//! They go to the same notifiers as dead-letter alerts, through
//! [`DeadLetterNotifier::notify_breaker`](super::DeadLetterNotifier::notify_breaker), one
//! notifier call per event on its own task under `alerts.timeout`: a breaker event is rare (at
//! most one per partition per cool-down) and urgent, so it is not aggregated into a window.
//! Nothing in it comes from a record's bytes: names from the configuration, counts, offsets.

use serde::Serialize;

/// What happened to a partition's breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum BreakerTransition {
    /// Tripped: too many dead letters; the partition is paused.
    Opened,
    /// The record tried after the cool-down was dead-lettered too; paused again, longer.
    Reopened,
    /// The record tried after the cool-down was handled (or sent to a retry tier).
    Closed,
    /// Closed by `RuntimeHandle::close_breaker`/`reset_breakers`.
    ClosedByOperator,
}

impl BreakerTransition {
    /// `opened`, `reopened`, `closed`, `closed_by_operator`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerTransition::Opened => "opened",
            BreakerTransition::Reopened => "reopened",
            BreakerTransition::Closed => "closed",
            BreakerTransition::ClosedByOperator => "closed_by_operator",
        }
    }
}

/// One transition of one partition's dead-letter flood breaker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct BreakerAlert {
    /// Consumer group of the partition (the retry group on a retry tier).
    pub group: String,
    /// The partition's topic: the source topic, or a retry tier topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// What happened.
    pub transition: BreakerTransition,
    /// The record whose outcome caused it (`None` for an operator's close).
    pub offset: Option<i64>,
    /// Dead letters in a row when it opened.
    pub consecutive: u32,
    /// Dead letters among the last `window_outcomes` outcomes when it opened.
    pub window_dead_letters: u32,
    /// Outcomes counted in the window (at most the configured window).
    pub window_outcomes: u32,
    /// The configured limits: dead letters in a row, dead letters per window, window.
    pub limits: (u32, u32, u32),
    /// How long the partition stays paused before one record is tried (when opened), ms.
    pub cool_down_ms: Option<u64>,
}

impl BreakerAlert {
    /// A readable summary (the Slack `text` of the webhook notifier).
    pub fn text(&self) -> String {
        let (consecutive, per_window, window) = self.limits;
        let at = self
            .offset
            .map_or(String::new(), |o| format!(" at offset {o}"));
        match self.transition {
            BreakerTransition::Opened | BreakerTransition::Reopened => format!(
                "sidetrack: dead-letter breaker {} for `{}`[{}] (group `{}`){at}: {} dead letters in a row, \
                 {} of the last {} outcomes (limits: {consecutive} in a row, {per_window} of {window}). \
                 The partition is paused; its records stay in the topic. One record is tried in {}; \
                 `RuntimeHandle::close_breaker` resumes it at once.",
                if self.transition == BreakerTransition::Opened { "OPEN" } else { "OPEN again (the record tried was dead-lettered)" },
                self.topic,
                self.partition,
                self.group,
                self.consecutive,
                self.window_dead_letters,
                self.window_outcomes,
                humantime::format_duration(std::time::Duration::from_millis(
                    self.cool_down_ms.unwrap_or(0)
                )),
            ),
            BreakerTransition::Closed => format!(
                "sidetrack: dead-letter breaker closed for `{}`[{}] (group `{}`){at}: the record tried was not dead-lettered; the partition flows again.",
                self.topic, self.partition, self.group
            ),
            BreakerTransition::ClosedByOperator => format!(
                "sidetrack: dead-letter breaker closed by an operator for `{}`[{}] (group `{}`); the partition flows again.",
                self.topic, self.partition, self.group
            ),
        }
    }
}

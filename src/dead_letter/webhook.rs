//! The webhook dead-letter notifier: one HTTP `POST` of JSON per alert (config
//! `alerts.webhook`, feature `webhook`).
//!
//! Separate from the alert aggregation (`alert.rs`) because it is only one way of telling
//! people: the aggregation decides *what* to say and *when*; this file only says it over HTTP.
//! The request is made with `ureq` on a blocking thread, since one request per alert window
//! does not justify an async HTTP client in the dependency tree. Failures never reach the
//! records: they are safe on the DLQ before an alert is built.

use std::time::Duration;

use serde::Serialize;

use super::{BreakerAlert, DeadLetterAlert, DeadLetterNotifier, NotifyError};

/// Posts each alert as JSON to a URL: `{"text": "<readable summary>", "sidetrack": {<the
/// alert's fields>}}`. The `text` field ([`DeadLetterAlert::slack_text`]: record bytes escaped,
/// Slack's `&`, `<`, `>` as entities) makes it work as a Slack incoming webhook as is.
///
/// HTTP and HTTPS (rustls, bundled web PKI roots) are supported. A status of 400 or more is a
/// failure. Requires the `webhook` feature.
///
/// Usually configured (`[alerts] webhook = "https://…"`); adding one in code is the same:
///
/// ```no_run
/// use std::time::Duration;
/// use sidetrack::dead_letter::WebhookNotifier;
/// # use sidetrack::{Config, Error, Handler};
/// # fn build(config: Config, handler: impl Handler) -> Result<(), Error> {
/// let runtime = sidetrack::Runtime::builder(config)
///     .handler(handler)
///     .dead_letter_notifier(
///         WebhookNotifier::new("https://hooks.example.com/T000/B000/XXXX")
///             .timeout(Duration::from_secs(5)),
///     )
///     .build()?;
/// # let _ = runtime; Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct WebhookNotifier {
    /// Where alerts are posted; any `http://` or `https://` URL (a Slack incoming webhook works).
    url: String,
    /// Bound on one request, connect to response. The runtime also bounds the whole
    /// notifier call by `alerts.timeout`, so a hanging endpoint never holds alerts back.
    timeout: Duration,
}

/// A dead-letter alert as posted: `text` for chat tools that show one field, `sidetrack`
/// with every field of the alert for receivers that route or count.
#[derive(Serialize)]
struct Body<'a> {
    /// The readable summary, escaped for Slack (see [`DeadLetterAlert::slack_text`]).
    text: String,
    /// The alert itself, serialised as its public fields.
    sidetrack: &'a DeadLetterAlert,
}

/// A breaker event: `{"text": …, "sidetrack_breaker": {…}}` (another key than a dead-letter
/// alert's, so a receiver tells them apart).
#[derive(Serialize)]
struct BreakerBody<'a> {
    text: String,
    /// The breaker event itself: group, topic, partition, transition and counts.
    sidetrack_breaker: &'a BreakerAlert,
}

impl WebhookNotifier {
    /// Posts to `url`, each request bounded by 10 s.
    pub fn new(url: impl Into<String>) -> Self {
        WebhookNotifier {
            url: url.into(),
            timeout: Duration::from_secs(10),
        }
    }

    /// Bounds each request (connect, send, read).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

impl DeadLetterNotifier for WebhookNotifier {
    fn name(&self) -> &str {
        "webhook"
    }

    async fn notify(&self, alert: &DeadLetterAlert) -> Result<(), NotifyError> {
        let body = serde_json::to_vec(&Body {
            text: alert.slack_text(),
            sidetrack: alert,
        })
        .map_err(|e| NotifyError::Failed(e.to_string()))?;
        self.post(body).await
    }

    async fn notify_breaker(&self, alert: &BreakerAlert) -> Result<(), NotifyError> {
        let body = serde_json::to_vec(&BreakerBody {
            text: alert.text(),
            sidetrack_breaker: alert,
        })
        .map_err(|e| NotifyError::Failed(e.to_string()))?;
        self.post(body).await
    }
}

impl WebhookNotifier {
    /// Posts `body` once (no retry: the next window's alert, or the log, is the fallback) on a
    /// blocking thread. A transport error or a status of 400 or more is [`NotifyError::Failed`],
    /// naming the URL; the caller counts it in `sidetrack_alert_failures_total`.
    async fn post(&self, body: Vec<u8>) -> Result<(), NotifyError> {
        let (url, timeout) = (self.url.clone(), self.timeout);
        // ureq is blocking; one short request per alert window does not deserve an async
        // HTTP stack.
        tokio::task::spawn_blocking(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(timeout))
                .http_status_as_error(false)
                .build()
                .into();
            let response = agent
                .post(&url)
                .header("content-type", "application/json")
                .send(&body[..])
                .map_err(|e| NotifyError::Failed(format!("POST {url}: {e}")))?;
            let status = response.status();
            if status.as_u16() >= 400 {
                return Err(NotifyError::Failed(format!("POST {url}: HTTP {status}")));
            }
            Ok(())
        })
        .await
        .map_err(|e| NotifyError::Failed(e.to_string()))?
    }
}

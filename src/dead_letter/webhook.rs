use std::time::Duration;

use serde::Serialize;

use super::{BreakerAlert, DeadLetterAlert, DeadLetterNotifier, NotifyError};

/// Posts each alert as JSON to a URL: `{"text": "<readable summary>", "sidetrack": {<the
/// alert's fields>}}`. The `text` field ([`DeadLetterAlert::slack_text`]: record bytes escaped,
/// Slack's `&`, `<`, `>` as entities) makes it work as a Slack incoming webhook as is.
///
/// HTTP and HTTPS (rustls, bundled web PKI roots) are supported. A status of 400 or more is a
/// failure. Requires the `webhook` feature.
#[derive(Debug, Clone)]
pub struct WebhookNotifier {
    url: String,
    timeout: Duration,
}

#[derive(Serialize)]
struct Body<'a> {
    text: String,
    sidetrack: &'a DeadLetterAlert,
}

/// A breaker event: `{"text": …, "sidetrack_breaker": {…}}` (another key than a dead-letter
/// alert's, so a receiver tells them apart).
#[derive(Serialize)]
struct BreakerBody<'a> {
    text: String,
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

//! [`TestRuntime`]: a handler run through the runtime's retry and dead-letter routing with no
//! broker. Separate from the embedded cluster because it needs no Kafka at all: each failure
//! is decided by [`RetryPolicy::decide`] and routed by [`next_hop`], the function the
//! production hand-off calls, so a test sees the topics and envelopes production would write.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};
use crate::handler::{Context, Handler, Message};
use crate::outcome::{Disposition, Reason};
use crate::retry::{next_hop, Envelope, RetryPolicy, Topology};
use crate::runtime::partition::call::{Caller, ErasedCall};
use crate::runtime::partition::meters::CallMeters;
use crate::runtime::watchdog::Calls;

/// What happened to one delivery in a [`TestRuntime`].
///
/// A report for assertions, not a second vocabulary: the failure variants are the
/// [`Disposition`] the retry policy decided plus what a test wants to see of the
/// [`next_hop`](crate::retry::next_hop) (the rendered retry topic, the error text as the envelope
/// carries it), and [`Outcome::Handled`] is the one result a `Disposition` has no word for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The handler succeeded.
    Handled,
    /// The record would be written to retry tier `tier` (0-based), topic `topic`, due `delay`
    /// later (without jitter).
    Retry {
        /// Tier index.
        tier: usize,
        /// Retry topic name.
        topic: String,
        /// Delay until due.
        delay: Duration,
    },
    /// The record would be written to the dead-letter topic.
    DeadLettered {
        /// Why.
        reason: Reason,
        /// The error text as the envelope would carry it.
        error: String,
    },
}

/// Runs a handler through the runtime's retry and dead-letter decisions, with no broker and
/// no waiting: retries are delivered at once, with the envelope the runtime would write.
///
/// The handler is called by the runtime's own call stage, the code a partition task runs for
/// every record: a panic becomes a retryable failure, and a call that outlives its time limit
/// (`handler_timeout`, or [`Handler::timeout`]) is cancelled and fails as retryable, with the
/// same error text. A call that waits needs a Tokio runtime with its time driver enabled (as
/// `#[tokio::test]` gives).
///
/// # Example
///
/// ```
/// use sidetrack::testing::{Outcome, TestRuntime};
/// use sidetrack::{handler_fn, Context, HandlerError, Message, Reason};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let rt = TestRuntime::new(handler_fn(|msg: Message, _cx: Context| async move {
///     match msg.payload_str()? {
///         "ok" => Ok(()),
///         other => Err(HandlerError::permanent(format!("unknown command `{other}`"))),
///     }
/// }));
/// assert_eq!(rt.deliver(&Message::new("orders", "ok")).await, Outcome::Handled);
/// let outcome = rt.deliver(&Message::new("orders", "launch")).await;
/// assert!(matches!(outcome, Outcome::DeadLettered { reason: Reason::Permanent, .. }));
/// # }
/// ```
pub struct TestRuntime {
    /// The handler, erased as the runtime erases it (one box per call is fine in tests).
    handler: Arc<dyn ErasedCall>,
    /// The configuration: group, retry tiers, topic naming and `handler_timeout`.
    config: Config,
    /// The retry policy resolved from `config` (validated by [`TestRuntime::with_config`]).
    policy: RetryPolicy,
    /// The handler's [`Context`]: the config's group, and a shutdown that never comes.
    cx: Context,
    /// The runtime's own call stage (the code its partition tasks run): panics caught, the
    /// time limit (`handler_timeout`, or the handler's own) enforced, the result classified
    /// by the policy. Its metrics record nothing and no watchdog thread runs.
    caller: Caller,
}

impl TestRuntime {
    /// A harness with the default retry policy and group `test`.
    pub fn new(handler: impl Handler) -> Self {
        let config = Config::new("embedded", "test", ["test"]);
        let policy = RetryPolicy::default();
        Self::from_parts(Arc::new(handler), config, policy)
    }

    /// A harness using `config`'s group, retry policy and topic naming (`brokers` and
    /// `topics` are not used).
    pub fn with_config(handler: impl Handler, config: &Config) -> Result<Self, ConfigError> {
        let policy = config.retry.policy()?;
        Ok(Self::from_parts(Arc::new(handler), config.clone(), policy))
    }

    /// The harness around an erased handler: its call stage with no-op metrics and no watchdog.
    fn from_parts(handler: Arc<dyn ErasedCall>, config: Config, policy: RetryPolicy) -> Self {
        let cx = Context::new(config.group.clone(), CancellationToken::new());
        let caller = Caller::new(
            handler.limits(&config),
            CallMeters::noop(),
            Calls::detached(),
        );
        TestRuntime {
            handler,
            config,
            policy,
            cx,
            caller,
        }
    }

    /// Calls the handler once through the runtime's call stage: `None` when handled, else
    /// the decision and the error text.
    async fn call(&self, msg: &Message) -> Option<(Disposition, String)> {
        self.handler
            .call(&self.caller, msg, &self.cx, &self.policy)
            .await
    }

    /// Delivers `msg` once (at its attempt number) and says what the runtime would do.
    pub async fn deliver(&self, msg: &Message) -> Outcome {
        match self.call(msg).await {
            None => Outcome::Handled,
            Some((decision, error)) => self.outcome(msg, decision, &error).0,
        }
    }

    /// Delivers `msg` and then every retry the runtime would make, until it is handled or
    /// dead-lettered. Returns one outcome per attempt.
    pub async fn deliver_until_done(&self, msg: Message) -> Vec<Outcome> {
        let mut outcomes = Vec::new();
        let mut msg = msg;
        loop {
            let Some((decision, error)) = self.call(&msg).await else {
                outcomes.push(Outcome::Handled);
                return outcomes;
            };
            let (outcome, envelope) = self.outcome(&msg, decision, &error);
            let (Outcome::Retry { topic, .. }, Some(envelope)) = (&outcome, envelope) else {
                outcomes.push(outcome);
                return outcomes;
            };
            // Round-trip the envelope through headers, as the retry consumer would read it.
            let mut headers = msg.headers().to_vec();
            headers.extend(envelope.to_headers());
            let next = match Envelope::split(&headers) {
                Ok((n, env)) => {
                    headers.truncate(n);
                    Message::from_parts(
                        (
                            &Arc::from(topic.as_str()),
                            msg.partition(),
                            msg.attempt() as i64,
                        ),
                        msg.timestamp(),
                        msg.key().map(<[u8]>::to_vec),
                        msg.payload().map(<[u8]>::to_vec),
                        headers,
                        Some(env),
                    )
                }
                Err(e) => {
                    outcomes.push(Outcome::DeadLettered {
                        reason: Reason::InvalidEnvelope,
                        error: e.to_string(),
                    });
                    return outcomes;
                }
            };
            outcomes.push(outcome);
            msg = next;
        }
    }

    /// What the runtime would do with `msg` after it failed with `error` and the policy
    /// decided `decision`: the route comes from [`next_hop`], as in production (time 0 and no
    /// jitter, so due times are reproducible). Also returns the hop's envelope, which the next
    /// delivery of a retry carries; `None` only if no topology can be rendered for the
    /// message's topic (a retry then reports an empty topic and is not delivered again).
    fn outcome(
        &self,
        msg: &Message,
        decision: Disposition,
        error: &str,
    ) -> (Outcome, Option<Envelope>) {
        let mut config = self.config.clone();
        config.topics = vec![msg.topic().to_owned()];
        let hop = Topology::new(&config, &self.policy)
            .ok()
            .and_then(|topology| {
                let hop = next_hop(msg, decision, error, &topology, &self.policy, 0, 0.0).ok()?;
                Some((hop.topic.to_owned(), hop.envelope))
            });
        let outcome = match decision {
            Disposition::Retry { tier, delay } => Outcome::Retry {
                tier,
                topic: hop.as_ref().map(|(t, _)| t.clone()).unwrap_or_default(),
                delay,
            },
            Disposition::DeadLetter(reason) => Outcome::DeadLettered {
                reason,
                error: crate::retry::truncate_error(error),
            },
        };
        (outcome, hop.map(|(_, envelope)| envelope))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RetryConfig;
    use crate::handler::handler_fn;
    use crate::retry::Tier;
    use crate::HandlerError;

    #[tokio::test]
    async fn flaky_record_walks_the_tiers_then_succeeds() {
        let rt = TestRuntime::new(handler_fn(|m: Message, _cx: Context| async move {
            if m.attempt() <= 4 {
                Err(HandlerError::retryable(format!(
                    "attempt {} failed",
                    m.attempt()
                )))
            } else {
                Ok(())
            }
        }));
        let outcomes = rt
            .deliver_until_done(Message::new("orders", "x").with_header("h", "v"))
            .await;
        let tiers: Vec<_> = outcomes
            .iter()
            .map(|o| match o {
                Outcome::Retry { tier, .. } => Some(*tier),
                _ => None,
            })
            .collect();
        assert_eq!(tiers, vec![Some(0), Some(0), Some(0), Some(1), None]);
        assert_eq!(outcomes.last(), Some(&Outcome::Handled));
        assert!(
            matches!(&outcomes[0], Outcome::Retry { topic, .. } if topic == "orders.test.retry.1s")
        );
    }

    /// The harness calls through the runtime's call stage: the time limit and panic catching
    /// apply as in production, and the outcome carries the runtime's error text.
    #[tokio::test]
    async fn the_time_limit_and_panics_apply_as_in_the_runtime() {
        let mut config = Config::new("b", "billing", ["orders"]);
        config.retry = RetryConfig::tiers([Tier::new(Duration::from_millis(500), 1)]);
        let rt = TestRuntime::with_config(
            handler_fn(|m: Message, _cx: Context| async move {
                if m.attempt() == 1 {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Ok(())
                } else {
                    panic!("boom on attempt {}", m.attempt())
                }
            })
            .with_timeout(Duration::from_millis(20)),
            &config,
        )
        .unwrap();
        let outcomes = rt.deliver_until_done(Message::new("orders", "x")).await;
        assert!(
            matches!(&outcomes[0], Outcome::Retry { tier: 0, .. }),
            "{outcomes:?}"
        );
        match &outcomes[1] {
            Outcome::DeadLettered { reason, error } => {
                assert_eq!(*reason, Reason::Exhausted);
                assert!(error.contains("boom on attempt 2"), "{error}");
            }
            other => panic!("expected a dead letter, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn always_failing_record_is_exhausted() {
        let mut config = Config::new("b", "billing", ["orders"]);
        config.retry = RetryConfig::tiers([Tier::new(Duration::from_millis(500), 2)]);
        let rt = TestRuntime::with_config(
            handler_fn(|_m: Message, _cx: Context| async { Err(HandlerError::retryable("down")) }),
            &config,
        )
        .unwrap();
        let outcomes = rt.deliver_until_done(Message::new("orders", "x")).await;
        assert_eq!(outcomes.len(), 3);
        assert_eq!(
            outcomes[2],
            Outcome::DeadLettered {
                reason: Reason::Exhausted,
                error: "down".into()
            }
        );
        assert!(matches!(&outcomes[0], Outcome::Retry { topic, delay, .. }
            if topic == "orders.billing.retry.500ms" && *delay == Duration::from_millis(500)));
    }
}

//! The runtime: a main consumer for the source topics and a retry consumer for the tier
//! topics, each running one task per assigned partition, plus the hand-off producer.
//!
//! * Records of one partition are handled one at a time, in order (`ordering = "partition"`),
//!   or several at once: by key (`"key"`) or not ordered (`"unordered"`); partitions in
//!   parallel. Offsets are stored at the contiguous frontier of durable outcomes.
//! * An offset is stored only after a durable outcome: the handler succeeded, or the record
//!   was acknowledged by the broker on a retry or dead-letter topic. If that hand-off fails the
//!   partition is paused and the hand-off retried with backoff; the partition never moves past
//!   the record. Stored offsets are committed by librdkafka's auto-commit (every second and
//!   on revoke) and by a final commit at shutdown.
//! * Retry tier partitions are paused until their head record is due.
//! * Shutdown stops fetching, lets in-flight handlers finish (up to
//!   [`Config::shutdown_timeout`], after which they are abandoned without storing their
//!   offsets), commits, and leaves the groups.

mod breaker;
pub(crate) mod client;
pub(crate) mod consumer;
mod group;
pub(crate) mod handoff;
pub(crate) mod partition;
mod pause;
mod producer;
mod provision;
pub(crate) mod scheduler;
mod shared;
mod signal;
mod supervisor;
pub(crate) mod watchdog;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::dead_letter::{Alerts, DeadLetterNotifier, ErasedNotifier, LogNotifier};
use crate::error::Error;
use crate::handler::{Context, Handler};
use crate::mocking::EmbeddedCluster;
use crate::retry::{RetryPolicy, Topology};

pub(crate) use client::{forward_error, forward_log};
use consumer::Role;
use group::Group;
use partition::RunPartition;
use producer::HandoffProducer;
use provision::TopicCreator;
pub use provision::{check_topics, TopicStatus};
pub use shared::StatsSnapshot;
use shared::{Shared, Stats};

/// Builds a [`Runtime`] from a [`Config`] and the things that live in code.
pub struct RuntimeBuilder {
    /// The configuration as given; validated by [`RuntimeBuilder::build`], not before.
    config: Config,
    /// The handler, its type erased once here (not per record): each partition task calls it
    /// through [`RunPartition`]. `None` until [`RuntimeBuilder::handler`]; building without one
    /// fails with [`Error::NoHandler`].
    handler: Option<Arc<dyn RunPartition>>,
    shutdown: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// How missing retry and dead-letter topics are created: the broker's CreateTopics API, or
    /// the embedded cluster's own method ([`RuntimeBuilder::embedded`]).
    creator: TopicCreator,
    /// librdkafka properties set in code for the consumers, merged over the config's before
    /// validation, so the managed properties refuse them like the config's own.
    consumer_overrides: Vec<(String, String)>,
    /// The same for the hand-off producer.
    producer_overrides: Vec<(String, String)>,
    /// Dead-letter notifiers added in code, beside those the config declares (the webhook).
    notifiers: Vec<Arc<dyn ErasedNotifier>>,
}

impl RuntimeBuilder {
    /// The handler that processes every record.
    pub fn handler(mut self, handler: impl Handler) -> Self {
        self.handler = Some(Arc::new(handler));
        self
    }

    /// A future that starts graceful shutdown when it completes, e.g.
    /// `async { tokio::signal::ctrl_c().await.ok(); }`. Without one the runtime runs until
    /// [`RuntimeHandle::shutdown`] is called.
    pub fn shutdown_signal(mut self, signal: impl Future<Output = ()> + Send + 'static) -> Self {
        self.shutdown = Some(Box::pin(signal));
        self
    }

    /// Adds a receiver of dead-letter alerts, besides the ones the config enables
    /// (`alerts.log`, `alerts.webhook`).
    pub fn dead_letter_notifier(mut self, notifier: impl DeadLetterNotifier) -> Self {
        self.notifiers.push(Arc::new(notifier));
        self
    }

    /// Uses an [`EmbeddedCluster`]: its bootstrap address, and its own way of creating
    /// topics (the mock broker has no CreateTopics API).
    ///
    /// The hand-off producer then sends one request at a time per broker
    /// (`max.in.flight.requests.per.connection=1`): the mock broker does not check idempotent
    /// sequence numbers for non-transactional producers, so with several requests in flight a
    /// failed batch can be acknowledged implicitly by a later one and be in no log — an
    /// acknowledgement Kafka itself never gives. One request at a time keeps the embedded
    /// broker honest about what was written.
    pub fn embedded(mut self, cluster: &EmbeddedCluster) -> Self {
        self.config.brokers = cluster.bootstrap_servers().to_owned();
        self.config.producer.retain(|k, _| {
            crate::config::canonical_property(k) != "max.in.flight.requests.per.connection"
        });
        self.config.producer.insert(
            "max.in.flight.requests.per.connection".to_owned(),
            "1".to_owned(),
        );
        self.creator = TopicCreator::Embedded(cluster.clone());
        self
    }

    /// A raw librdkafka property for both consumers, applied after the config's own.
    pub fn consumer_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.consumer_overrides.push((key.into(), value.into()));
        self
    }

    /// A raw librdkafka property for the hand-off producer, applied after the config's own.
    pub fn producer_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.producer_overrides.push((key.into(), value.into()));
        self
    }

    /// Validates the configuration and builds the runtime. Nothing connects yet.
    pub fn build(self) -> Result<Runtime, Error> {
        let mut config = self.config;
        config.consumer.extend(self.consumer_overrides);
        config.producer.extend(self.producer_overrides);
        config.validate()?;
        let handler = self.handler.ok_or(Error::NoHandler)?;
        let policy = config.retry.policy()?;
        let topology = Topology::new(&config, &policy)?;
        let mut notifiers = self.notifiers;
        if config.alerts.log {
            notifiers.insert(0, Arc::new(LogNotifier));
        }
        #[cfg(feature = "webhook")]
        if let Some(url) = &config.alerts.webhook {
            notifiers.push(Arc::new(
                crate::dead_letter::WebhookNotifier::new(url).timeout(config.alerts.timeout),
            ));
        }
        Ok(Runtime {
            config,
            policy,
            topology,
            handler,
            shutdown: self.shutdown,
            creator: self.creator,
            notifiers,
        })
    }
}

/// A configured, not yet started runtime. See the [module docs](self) for its guarantees.
pub struct Runtime {
    config: Config,
    /// The retry policy resolved from `config.retry` (tiers, jitter), checked.
    policy: RetryPolicy,
    /// Every retry-tier and dead-letter topic name, rendered and checked once.
    topology: Topology,
    handler: Arc<dyn RunPartition>,
    shutdown: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    creator: TopicCreator,
    notifiers: Vec<Arc<dyn ErasedNotifier>>,
}

impl Runtime {
    /// Starts building a runtime.
    pub fn builder(config: Config) -> RuntimeBuilder {
        RuntimeBuilder {
            config,
            handler: None,
            shutdown: None,
            creator: TopicCreator::Admin,
            consumer_overrides: Vec::new(),
            producer_overrides: Vec::new(),
            notifiers: Vec::new(),
        }
    }

    /// The topic names this runtime uses.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Starts and runs until the shutdown signal, then shuts down gracefully. Returns an
    /// error if the runtime could not start, or stopped because of a fatal client error
    /// ([`Error::Fatal`]) — never a healthy-looking process that does nothing.
    pub async fn run(self) -> Result<(), Error> {
        self.start().await?.wait().await.map(|_| ())
    }

    /// Checks (and creates) topics, joins the groups and starts consuming. Returns a handle to
    /// observe and stop the running runtime.
    pub async fn start(self) -> Result<RuntimeHandle, Error> {
        #[cfg(feature = "prometheus")]
        if let Some(listen) = self.config.metrics.listen {
            crate::metrics::install_prometheus(listen)?;
            tracing::info!(%listen, "serving Prometheus metrics on /metrics");
        }
        crate::metrics::describe();
        let partitions = provision::provision(&self.config, &self.topology, &self.creator).await?;
        provision::key_order_logs_done(&self.config, &self.topology).await?;
        let producer = HandoffProducer::new(client::producer_config(&self.config))?;
        let shutdown = signal::Signal::new();
        let alerts = Arc::new(Alerts::new(
            self.notifiers,
            self.config.alerts.max_examples,
            self.config.alerts.timeout,
            self.config.alerts.window,
            self.config.handoff.timeout + Duration::from_secs(1),
            self.config.brokers.clone(),
            self.config.alerts.command.clone(),
        ));
        let watchdog = watchdog::Watchdog::start(self.config.handler_blocking_after);
        let shared = Arc::new(Shared {
            alerts,
            cx: Context::new(self.config.group.clone(), shutdown.token().clone()),
            stats: Stats::new(self.policy.tiers().len()),
            config: self.config,
            policy: self.policy,
            topology: self.topology,
            producer,
            partitions,
            shutdown: shutdown.clone(),
            fatal: std::sync::Mutex::new(None),
            watchdog,
            breakers: Arc::default(),
        });
        let sources: Vec<String> = shared
            .topology
            .sources()
            .iter()
            .map(|s| s.topic.clone())
            .collect();
        let main = Group::start(&shared, &self.handler, Role::Main, &sources)?;
        let retry_topics: Vec<String> = shared
            .topology
            .retry_topics()
            .into_iter()
            .map(str::to_owned)
            .collect();
        let retry = if retry_topics.is_empty() {
            None
        } else {
            Some(Group::start(
                &shared,
                &self.handler,
                Role::Retry,
                &retry_topics,
            )?)
        };
        if let Some(signal) = self.shutdown {
            let token = shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = signal => {
                        tracing::info!("shutdown signal received");
                        token.cancel();
                    }
                    _ = token.cancelled() => {}
                }
            });
        }
        tracing::info!(
            group = shared.topology.group(),
            topics = ?sources,
            retry_topics = ?retry_topics,
            "sidetrack runtime started"
        );
        let alerts_stop = CancellationToken::new();
        let alerts_task = tokio::spawn(
            Arc::clone(&shared.alerts).run(shared.config.group.clone(), alerts_stop.clone()),
        );
        Ok(RuntimeHandle {
            shared,
            main,
            retry,
            alerts: (alerts_task, alerts_stop),
        })
    }
}

/// A running runtime.
pub struct RuntimeHandle {
    /// State every task of both groups reads: config, policy, topology, the erased handler, the
    /// hand-off producer, stats, alerts and the shutdown signal.
    shared: Arc<Shared>,
    /// The consumer group reading the source topics.
    main: Group,
    /// The consumer group reading the retry tiers (`retry.group`); `None` when no tier is
    /// configured.
    retry: Option<Group>,
    /// The task that sends dead-letter alerts, and its stop: cancelled after both groups ended,
    /// so dead letters of the last moments are still announced.
    alerts: (tokio::task::JoinHandle<()>, CancellationToken),
}

impl RuntimeHandle {
    /// Counters of what happened so far.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// The topic names in use.
    pub fn topology(&self) -> &Topology {
        &self.shared.topology
    }

    /// Source-topic partitions currently assigned to this instance, sorted.
    pub fn assigned_partitions(&self) -> Vec<(String, i32)> {
        self.main.assigned()
    }

    /// Partitions (source or retry tier topic, partition) whose dead-letter flood breaker
    /// holds them now (open, or half-open until the record tried has an outcome), sorted.
    /// See [`crate::config::BreakerConfig`].
    pub fn open_breakers(&self) -> Vec<(String, i32)> {
        self.shared.breakers.open()
    }

    /// Closes the dead-letter flood breaker of `topic` (a source or retry tier topic)
    /// `partition` now, without waiting for its cool-down: the partition resumes from its
    /// first record without an outcome, and dead letters are counted from zero. False if this
    /// instance does not own that partition or its breaker is not open. While half-open, the
    /// record being tried finishes first; the breaker is closed whatever its outcome.
    pub fn close_breaker(&self, topic: &str, partition: i32) -> bool {
        self.shared.breakers.close(topic, partition)
    }

    /// Closes every open dead-letter flood breaker of this instance (see
    /// [`RuntimeHandle::close_breaker`]); returns how many.
    pub fn reset_breakers(&self) -> usize {
        self.shared.breakers.close_all()
    }

    /// True once shutdown has been triggered (signal or [`RuntimeHandle::trigger_shutdown`]).
    pub fn is_shutting_down(&self) -> bool {
        self.shared.shutdown.is_cancelled()
    }

    /// Starts graceful shutdown without waiting for it; see [`RuntimeHandle::wait`].
    pub fn trigger_shutdown(&self) {
        self.shared.shutdown.cancel();
    }

    /// Starts graceful shutdown and waits for it to finish.
    pub async fn shutdown(self) -> Result<StatsSnapshot, Error> {
        self.trigger_shutdown();
        self.wait().await
    }

    /// Waits until shutdown is triggered (by the signal, [`RuntimeHandle::trigger_shutdown`]
    /// or a fatal client error), then stops fetching, finishes or abandons in-flight work,
    /// commits and leaves the groups. A fatal client error is returned as [`Error::Fatal`]
    /// after that graceful stop.
    pub async fn wait(self) -> Result<StatsSnapshot, Error> {
        self.shared.shutdown.cancelled().await;
        let timeout = self.shared.config.shutdown_timeout;
        let retry = async {
            if let Some(g) = self.retry {
                g.stop(timeout).await;
            }
        };
        tokio::join!(self.main.stop(timeout), retry);
        // Last alert window: the records are on the DLQ already; give notifiers their timeout.
        let (alerts_task, alerts_stop) = self.alerts;
        alerts_stop.cancel();
        let _ = alerts_task.await;
        let stats = self.shared.stats.snapshot();
        let shared = self.shared;
        // Every hand-off was awaited already; flushing is a formality. Dropping the clients
        // can block, so it happens on a thread of its own, with a deadline.
        let fatal = shared
            .fatal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let _ = group::off_thread("flush", group::CLOSE_TIMEOUT, move || {
            shared.producer.flush(Duration::from_secs(5));
            drop(shared);
        })
        .await;
        if let Some(error) = fatal {
            tracing::error!(?stats, %error, "sidetrack runtime stopped by a fatal error");
            return Err(error);
        }
        tracing::info!(?stats, "sidetrack runtime stopped");
        Ok(stats)
    }
}

//! The crate's one error type, [`Error`]: what stops a runtime from starting or running.
//!
//! Kept apart from every stage's own errors (`ConfigError`, `EnvelopeError`, `HopError`, the
//! proxy's `ApiError`) because it is what an application matches on at the top: each variant
//! says what to do (fix the config, create a topic, restart), and the stage errors are carried
//! inside it with `#[from]` rather than flattened into text. A handler's failure is never an
//! `Error`: it becomes a retry or a dead letter, and the runtime goes on.
//!
//! `#[non_exhaustive]`, so a new way to fail is not a breaking change; match with a `_` arm.

use rdkafka::error::KafkaError;

use crate::config::ConfigError;

/// Everything that can stop a [`Runtime`](crate::Runtime) from starting or running.
///
/// Handler failures are not errors of the runtime: they become retries or dead letters.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid; the message names the field.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// No handler was given to the builder.
    #[error("no handler: call RuntimeBuilder::handler before build()")]
    NoHandler,
    /// A topic the runtime consumes from does not exist on the broker.
    #[error("source topic `{0}` does not exist on the broker")]
    SourceTopicMissing(String),
    /// Retry or dead-letter topics are missing and creating them is not allowed.
    #[error(
        "missing topics: {}; create them with the source topic's partition count \
         or set provisioning.auto_create = true",
        .0.join(", ")
    )]
    MissingTopics(Vec<String>),
    /// `retry.keep_key_order`: a source topic has more partitions than its key-order log
    /// (partitions were added to the source after the log was created). Partition *p* of the
    /// log serves source partition *p*, so the extra partitions could not keep their order.
    #[error(
        "key-order log `{log}` has {has} partitions but its source `{source_topic}` has {needs}: \
         add partitions to the log (kafka-topics --alter --partitions {needs}) before starting"
    )]
    KeyOrderLogTooSmall {
        /// The key-order log.
        log: String,
        /// Its partition count.
        has: i32,
        /// The source topic.
        source_topic: String,
        /// The source's partition count.
        needs: i32,
    },
    /// `retry.keep_key_order` is off, but a key-order log of this runtime still holds events
    /// not yet done (held records, or heads waiting for their release): with the option off
    /// nothing would read them, and the held records would never be handled.
    #[error(
        "key-order log `{log}` still holds {events} event(s) not yet done (held records or \
         heads waiting for their release) and retry.keep_key_order is off: nothing would handle \
         them; start with keep_key_order = true until `sidetrack lag` shows 0 held"
    )]
    KeyOrderLogNotDone {
        /// The key-order log.
        log: String,
        /// Events past its committed position.
        events: i64,
    },
    /// Creating a retry or dead-letter topic failed.
    #[error("could not create topic `{topic}`: {reason}")]
    TopicCreation {
        /// The topic that could not be created.
        topic: String,
        /// What the broker (or the embedded cluster) said.
        reason: String,
    },
    /// The metrics exporter could not be installed.
    #[error("metrics: {0}")]
    Metrics(String),
    /// A Kafka client hit a fatal error that sidetrack could not recover from (a fatal
    /// consumer error, or a hand-off producer that keeps failing fatally after being
    /// replaced). The runtime shut down; records without a durable outcome are delivered
    /// again after a restart.
    #[error("fatal error of the {client}: {reason}")]
    Fatal {
        /// Which client: `consumer (main)`, `consumer (retry)` or `hand-off producer`.
        client: &'static str,
        /// librdkafka's description of the error.
        reason: String,
    },
    /// A librdkafka call failed; `context` says which step.
    #[error("{context}: {source}")]
    Kafka {
        /// The step that failed, e.g. "creating the consumer".
        context: &'static str,
        /// The underlying error.
        #[source]
        source: KafkaError,
    },
}

impl Error {
    pub(crate) fn kafka(context: &'static str) -> impl FnOnce(KafkaError) -> Error {
        move |source| Error::Kafka { context, source }
    }
}

//! The hand-off producer shared by every partition task (idempotent, `acks=all`), and its
//! replacement after a fatal error.
//!
//! A file of its own, apart from the hand-off stage (`handoff.rs`) that sends on it: the
//! producer is made once per runtime and kept in its shared state, the stage once per
//! partition task; neither needs the other's internals.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, Producer as _};
use rdkafka::ClientConfig;

use crate::error::Error;
use crate::metrics as m;

use super::client::TracingContext;

/// After this many producer rebuilds within [`REBUILD_WINDOW`], a fatal error is taken as one
/// a new producer cannot get past: the runtime stops with an error instead of spinning.
const MAX_REBUILDS: usize = 5;
/// The window [`MAX_REBUILDS`] is counted in: long enough that a broker bug met every few
/// minutes stops the runtime, short enough that rare fatal errors over weeks never add up.
const REBUILD_WINDOW: Duration = Duration::from_secs(600);

/// One producer instance; replaced as a whole after a fatal error.
pub(crate) struct Generation {
    /// Which producer this is (0 for the first): a sender that failed on generation `n` only
    /// replaces it if it is still the current one, so a burst of failures replaces it once.
    id: u64,
    /// The librdkafka producer; its log and errors go to `tracing`.
    pub(crate) producer: FutureProducer<TracingContext>,
}

/// The hand-off producer shared by every partition task (idempotent, `acks=all`).
///
/// An idempotent producer that hits a fatal error (e.g. a sequence the broker rejects) fails
/// every later send for ever. The first send that sees it replaces the producer with a new one
/// (a new producer id), and the waiting hand-offs are sent again on it. A producer that keeps
/// failing fatally (more than [`MAX_REBUILDS`] replacements in [`REBUILD_WINDOW`]) cannot be
/// helped by another one: [`HandoffProducer::recover`] then returns the error, and the runtime
/// stops with it.
pub(crate) struct HandoffProducer {
    /// The configuration every generation is created from (idempotence and `acks=all` set).
    config: ClientConfig,
    /// The generation to send on. Read once per hand-off (not per record handled), written
    /// only when replacing; senders hold an `Arc`, so a replaced producer lives until its last
    /// send settles.
    current: RwLock<Arc<Generation>>,
    /// The id of the next generation.
    next_id: AtomicU64,
    /// When each recent replacement happened, pruned to [`REBUILD_WINDOW`].
    rebuilds: Mutex<VecDeque<Instant>>,
}

impl HandoffProducer {
    /// The first generation, from `config`.
    ///
    /// # Errors
    ///
    /// [`Error::Kafka`] when librdkafka refuses the configuration.
    pub(crate) fn new(config: ClientConfig) -> Result<Self, Error> {
        let first = Self::create(&config, 0)?;
        Ok(HandoffProducer {
            config,
            current: RwLock::new(Arc::new(first)),
            next_id: AtomicU64::new(1),
            rebuilds: Mutex::new(VecDeque::new()),
        })
    }

    /// One generation: a producer created from `config`, numbered `id`.
    fn create(config: &ClientConfig, id: u64) -> Result<Generation, Error> {
        let producer = config
            .create_with_context(TracingContext)
            .map_err(Error::kafka("creating the hand-off producer"))?;
        Ok(Generation { id, producer })
    }

    /// The producer to send with now.
    pub(crate) fn current(&self) -> Arc<Generation> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// A send on `used` failed: if that producer hit a fatal error, replace it (once, whoever
    /// asks first). `Ok(true)`: replaced or already replaced, send again; `Ok(false)`: not a
    /// fatal error; `Err`: not recoverable.
    ///
    /// librdkafka reports the first failed send with the broker's error (e.g.
    /// OUT_OF_ORDER_SEQUENCE_NUMBER) and later ones with `Fatal`; only the client knows which
    /// errors were fatal, so it is asked (failures are rare; this is off the per-record path).
    pub(crate) fn recover(&self, used: &Generation) -> Result<bool, Error> {
        let Some((code, text)) = used.producer.client().fatal_error() else {
            return Ok(false);
        };
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if current.id != used.id {
            return Ok(true);
        }
        let reason = format!("{code:?}: {text}");
        metrics::counter!(m::CLIENT_FATAL_ERRORS, "client" => "producer").increment(1);
        {
            let mut recent = self.rebuilds.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            while recent
                .front()
                .is_some_and(|t| now.duration_since(*t) > REBUILD_WINDOW)
            {
                recent.pop_front();
            }
            if recent.len() >= MAX_REBUILDS {
                return Err(Error::Fatal {
                    client: "hand-off producer",
                    reason: format!(
                        "{reason} (still failing after {MAX_REBUILDS} new producers in {}s)",
                        REBUILD_WINDOW.as_secs()
                    ),
                });
            }
            recent.push_back(now);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let fresh = Self::create(&self.config, id).map_err(|e| Error::Fatal {
            client: "hand-off producer",
            reason: format!("{reason}; a new producer could not be created: {e}"),
        })?;
        let old = std::mem::replace(&mut *current, Arc::new(fresh));
        drop(current);
        tracing::error!(%reason, generation = id, "hand-off producer replaced after a fatal error; waiting hand-offs are sent again");
        // Dropping a producer purges and flushes for up to 500 ms: not on this thread.
        std::thread::spawn(move || drop(old));
        Ok(true)
    }

    /// Flushes the current producer (shutdown).
    pub(crate) fn flush(&self, timeout: Duration) {
        let _ = self.current().producer.flush(timeout);
    }
}

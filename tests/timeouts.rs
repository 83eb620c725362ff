//! Handler time limits: a call that never returns used to stop its partition for ever,
//! silently (no log, no metric, no progress). Now it is warned about once, cancelled at its
//! time limit and sent to its retry tier (or the DLQ) like any failure; the age of the oldest
//! running call is a gauge; and a handler that blocks its thread is reported at ERROR.
//!
//! One global metrics recorder and one global log capture serve the whole binary, so every
//! test reads only its own topic's labels and log fields.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::*;
use sidetrack::config::{Ordering as RecordOrdering, RetryConfig};
use sidetrack::metrics as m;
use sidetrack::retry::headers as h;
use sidetrack::{Context, Handler, HandlerError, Message};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

// ------------------------------------------------------------------ metrics

use common::recording::recorder;

/// A counter's total over every series of `topic`.
fn counter(name: &str, topic: &str) -> u64 {
    common::recording::counter(name, &[("topic", topic)])
}

/// A gauge's largest value over every series of `topic`.
fn gauge(name: &str, topic: &str) -> f64 {
    common::recording::max_gauge(name, &[("topic", topic)])
}

// ------------------------------------------------------------------ logs

/// A WARN or ERROR event: its level, message and fields (as `Display`/`Debug` text).
#[derive(Clone, Debug)]
struct Event {
    level: tracing::Level,
    message: String,
    fields: Vec<(String, String)>,
}

impl Event {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

struct Capture(Arc<Mutex<Vec<Event>>>);

impl<S: tracing::Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Fields(Vec<(String, String)>, String);
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                if f.name() == "message" {
                    self.1 = format!("{v:?}");
                } else {
                    self.0.push((f.name().to_owned(), format!("{v:?}")));
                }
            }
            fn record_str(&mut self, f: &tracing::field::Field, v: &str) {
                self.0.push((f.name().to_owned(), v.to_owned()));
            }
        }
        let mut fields = Fields(Vec::new(), String::new());
        event.record(&mut fields);
        self.0.lock().unwrap().push(Event {
            level: *event.metadata().level(),
            message: fields.1,
            fields: fields.0,
        });
    }
}

/// Every WARN and ERROR event of the binary so far (installs the capture on first use,
/// before `common::init_tracing` can install its own subscriber).
fn logs() -> Arc<Mutex<Vec<Event>>> {
    static L: OnceLock<Arc<Mutex<Vec<Event>>>> = OnceLock::new();
    Arc::clone(L.get_or_init(|| {
        let events = Arc::new(Mutex::new(Vec::new()));
        let _ = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_test_writer()
                    .with_filter(
                        tracing_subscriber::EnvFilter::try_from_default_env()
                            .unwrap_or_else(|_| "warn,librdkafka=error".into()),
                    ),
            )
            .with(
                Capture(Arc::clone(&events)).with_filter(tracing::level_filters::LevelFilter::WARN),
            )
            .try_init();
        events
    }))
}

/// The captured events of `topic` whose message contains `text`.
fn events(topic: &str, text: &str) -> Vec<Event> {
    logs()
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.field("topic") == Some(topic) && e.message.contains(text))
        .cloned()
        .collect()
}

/// A scenario of this suite on `backend` (`on_every_broker!`'s general form), with the log
/// capture and the metrics recorder installed before anything logs; `topic` is the test's
/// name, the group `timeouts-g`.
async fn captured<F>(backend: Backend, topic: &str, partitions: i32, body: impl FnOnce(Env) -> F)
where
    F: std::future::Future<Output = ()>,
{
    logs();
    recorder();
    if let Some(env) = Env::on(backend, topic, "timeouts-g", partitions).await {
        within_limit(body(env)).await
    }
}

// ------------------------------------------------------------------ handlers

/// Hangs for ever (an `.await` that never completes) on the first attempt of the record
/// `stuck` (every attempt when `always`); handles everything else at once, remembering it.
#[derive(Clone, Default)]
struct HangsOnce {
    handled: Arc<Mutex<Vec<(String, u32)>>>,
    hung: Arc<AtomicUsize>,
    always: bool,
}

impl HangsOnce {
    fn payloads(&self) -> HashSet<String> {
        self.handled
            .lock()
            .unwrap()
            .iter()
            .map(|(p, _)| p.clone())
            .collect()
    }
}

impl Handler for HangsOnce {
    async fn handle(&self, msg: &Message, _cx: &Context) -> Result<(), HandlerError> {
        let payload = msg.payload_str()?.to_owned();
        if payload == "stuck" && (self.always || msg.attempt() == 1) {
            self.hung.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        self.handled.lock().unwrap().push((payload, msg.attempt()));
        Ok(())
    }
}

fn limited(env: &Env, ordering: RecordOrdering) -> sidetrack::Config {
    let mut config = env.config();
    config.ordering = ordering;
    // As in the report: intake stops at `max_ahead` behind a record without an outcome.
    config.max_ahead = 50;
    config.handler_timeout = Duration::from_secs(1);
    config.handler_warn_after = Duration::from_millis(200);
    config
}

// ------------------------------------------------------------------ scenarios

/// A call that never returns, for the first record of the partition, with 200 records behind
/// it: after its time limit it goes to the first retry tier ("timed out after 1s"), is handled
/// there, the 200 are handled, the committed offset passes it, the timeout is counted once and
/// the slow call was logged at WARN once (with its offset and escaped key).
async fn a_call_that_never_returns_is_timed_out(env: Env, ordering: RecordOrdering) {
    let handler = HangsOnce::default();
    let rt = env
        .builder(limited(&env, ordering))
        .handler(handler.clone())
        .started()
        .await;
    let mut payloads = vec!["stuck".to_owned()];
    payloads.extend((0..200).map(|i| format!("r{i}")));
    env.produce_all(&payloads, 1).await;
    wait_for(
        "the 200 records behind the stuck one, and it on retry",
        || handler.payloads().len() == 201,
    )
    .await;
    let stats = rt.shutdown().await.unwrap();
    assert_eq!(handler.hung.load(Ordering::SeqCst), 1);
    let handled = handler.handled.lock().unwrap().clone();
    assert_eq!(handled.len(), 201, "each record handled once: {handled:?}");
    assert!(handled.contains(&("stuck".to_owned(), 2)), "{handled:?}");
    assert_eq!(stats.retried[0], 1);
    assert_eq!(stats.total_dead_lettered(), 0);
    assert_eq!(counter(m::HANDLER_TIMEOUTS, env.topic()), 1);

    let tier = env.read_all(&env.retry("200ms")).await;
    assert_eq!(tier.len(), 1);
    assert_eq!(tier[0].header_str(h::ERROR), Some("timed out after 1s"));
    assert_eq!(tier[0].header_str(h::ERROR_KIND), Some("retryable"));
    assert_eq!(
        env.committed_offset(env.group(), env.topic(), 0).await,
        Some(201)
    );

    let slow = events(env.topic(), "slow handler call");
    assert_eq!(slow.len(), 1, "{slow:?}");
    assert_eq!(slow[0].level, tracing::Level::WARN);
    assert_eq!(slow[0].field("offset"), Some("0"));
    assert_eq!(slow[0].field("partition"), Some("0"));
    assert_eq!(slow[0].field("key"), Some("stuck"));
    assert_eq!(events(env.topic(), "timed out").len(), 1);
    assert_eq!(
        gauge(m::HANDLER_OLDEST_CALL_SECONDS, env.topic()),
        0.0,
        "no call runs after shutdown"
    );
}

async fn partition_ordering(env: Env) {
    a_call_that_never_returns_is_timed_out(env, RecordOrdering::Partition).await
}
on_every_broker!(hanging_call_in_partition_ordering, |backend| captured(
    backend,
    "hanging_call_in_partition_ordering",
    1,
    partition_ordering
));

async fn key_ordering(env: Env) {
    a_call_that_never_returns_is_timed_out(env, RecordOrdering::Key).await
}
on_every_broker!(hanging_call_in_key_ordering, |backend| captured(
    backend,
    "hanging_call_in_key_ordering",
    1,
    key_ordering
));

/// With no retries left, a call that times out is dead-lettered as `exhausted`, and the reason
/// says it timed out.
async fn a_call_that_always_hangs_is_dead_lettered_with_the_reason(env: Env) {
    let handler = HangsOnce {
        always: true,
        ..HangsOnce::default()
    };
    let mut config = limited(&env, RecordOrdering::Partition);
    config.retry = RetryConfig::disabled();
    config.handler_timeout = Duration::from_millis(500);
    let rt = env.builder(config).handler(handler.clone()).started().await;
    env.produce_all(&["stuck".to_owned(), "next".to_owned()], 1)
        .await;
    wait_for("dead-lettered, and the next record handled", || {
        rt.stats().total_dead_lettered() == 1 && handler.payloads().contains("next")
    })
    .await;
    rt.shutdown().await.unwrap();
    let dlq = env.read_all(&env.dlq()).await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].header_str(h::ERROR_KIND), Some("exhausted"));
    assert_eq!(dlq[0].header_str(h::ERROR), Some("timed out after 500ms"));
    assert_eq!(counter(m::HANDLER_TIMEOUTS, env.topic()), 1);
    assert_eq!(
        env.committed_offset(env.group(), env.topic(), 0).await,
        Some(2)
    );
}
on_every_broker!(hanging_call_dead_lettered, |backend| captured(
    backend,
    "hanging_call_dead_lettered",
    1,
    a_call_that_always_hangs_is_dead_lettered_with_the_reason
));

/// A handler's own limit ([`Handler::timeout`], here through `handler_fn(..).with_timeout`)
/// wins over the config's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handlers_own_limit_wins_over_the_config() {
    logs();
    recorder();
    let env = Env::embedded_named("own-limit", "own-limit-g", 1);
    let mut config = env.config();
    config.retry = RetryConfig::disabled();
    config.handler_timeout = Duration::from_secs(3600);
    let handler = sidetrack::handler_fn(|_m: Message, _cx: Context| async move {
        std::future::pending::<()>().await;
        Ok(())
    })
    .with_timeout(Duration::from_millis(300));
    let rt = env.builder(config).handler(handler).started().await;
    env.produce_all(&["x".to_owned()], 1).await;
    wait_for("dead-lettered", || rt.stats().total_dead_lettered() == 1).await;
    rt.shutdown().await.unwrap();
    let dlq = env.read_all(&env.dlq()).await;
    assert_eq!(dlq[0].header_str(h::ERROR), Some("timed out after 300ms"));
}

/// The oldest-call gauge rises while a call waits and falls to 0 once it is done, in
/// `partition` and in `key` ordering.
async fn the_oldest_call_gauge_follows_a_hanging_call(ordering: RecordOrdering, name: &str) {
    logs();
    recorder();
    let env = Env::embedded_named(name, &format!("{name}-g"), 1);
    let mut config = env.config();
    config.ordering = ordering;
    let gated = Gated::closed();
    let rt = env.builder(config).handler(gated.clone()).started().await;
    env.produce_all(&["a".to_owned(), "b".to_owned()], 1).await;
    let topic = env.topic().to_owned();
    wait_for("the gauge shows a running call", || {
        gauge(m::HANDLER_OLDEST_CALL_SECONDS, &topic) > 0.0
    })
    .await;
    let first = gauge(m::HANDLER_OLDEST_CALL_SECONDS, &topic);
    wait_for("the gauge keeps rising while the call hangs", || {
        gauge(m::HANDLER_OLDEST_CALL_SECONDS, &topic) > first
    })
    .await;
    gated.gate.add_permits(2);
    wait_for("both handled", || rt.stats().handled == 2).await;
    wait_for("the gauge falls to 0", || {
        gauge(m::HANDLER_OLDEST_CALL_SECONDS, &topic) == 0.0
    })
    .await;
    rt.shutdown().await.unwrap();
    assert_eq!(counter(m::HANDLER_TIMEOUTS, &topic), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oldest_call_gauge_in_partition_ordering() {
    the_oldest_call_gauge_follows_a_hanging_call(RecordOrdering::Partition, "gauge-partition").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oldest_call_gauge_in_key_ordering() {
    the_oldest_call_gauge_follows_a_hanging_call(RecordOrdering::Key, "gauge-key").await
}

/// A handler that blocks its worker thread (`std::thread::sleep`) cannot be cancelled; it is
/// reported once at ERROR with the advice, and counted. The record is still handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_blocks_its_thread_is_reported() {
    logs();
    recorder();
    let env = Env::embedded_named("blocking", "blocking-g", 1);
    let mut config = env.config();
    config.handler_blocking_after = Duration::from_millis(500);
    let handler = Recorder::new(|m| {
        if m.payload() == Some(&b"block"[..]) {
            std::thread::sleep(Duration::from_secs(3));
        }
        Ok(())
    });
    let rt = env.builder(config).handler(handler.clone()).started().await;
    env.produce_all(&["block".to_owned(), "after".to_owned()], 1)
        .await;
    wait_for("both handled", || rt.stats().handled == 2).await;
    rt.shutdown().await.unwrap();
    assert_eq!(counter(m::HANDLER_BLOCKING, env.topic()), 1);
    let reports = events(env.topic(), "blocking its thread");
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(reports[0].level, tracing::Level::ERROR);
    assert_eq!(reports[0].field("offset"), Some("0"));
    assert!(reports[0].message.contains("spawn_blocking"), "{reports:?}");
    assert_eq!(counter(m::HANDLER_TIMEOUTS, env.topic()), 0);
}

/// A normal fast handler: no warning, no timeout, no blocking report, the gauge at 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_handler_triggers_none_of_it() {
    logs();
    recorder();
    let env = Env::embedded_named("fast", "fast-g", 2);
    let mut config = env.config();
    config.ordering = RecordOrdering::Key;
    let handler = Recorder::new(|_| Ok(()));
    let rt = env.builder(config).handler(handler.clone()).started().await;
    let payloads: Vec<String> = (0..200).map(|i| format!("f{i}")).collect();
    env.produce_all(&payloads, 2).await;
    wait_for("all handled", || rt.stats().handled == 200).await;
    rt.shutdown().await.unwrap();
    assert_eq!(counter(m::HANDLER_TIMEOUTS, env.topic()), 0);
    assert_eq!(counter(m::HANDLER_BLOCKING, env.topic()), 0);
    assert_eq!(gauge(m::HANDLER_OLDEST_CALL_SECONDS, env.topic()), 0.0);
    let noise: Vec<Event> = logs()
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.field("topic") == Some(env.topic()))
        .cloned()
        .collect();
    assert!(noise.is_empty(), "{noise:?}");
}

/// A handler that blocks before it even returns its future (the synchronous part of
/// `handle`) is reported too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_blocks_before_its_future_exists_is_reported() {
    struct BlocksEagerly;
    impl Handler for BlocksEagerly {
        #[allow(clippy::manual_async_fn)]
        fn handle(
            &self,
            _msg: &Message,
            _cx: &Context,
        ) -> impl std::future::Future<Output = Result<(), HandlerError>> + Send {
            std::thread::sleep(Duration::from_secs(2));
            async { Ok(()) }
        }
    }
    logs();
    recorder();
    let env = Env::embedded_named("blocking-eager", "blocking-eager-g", 1);
    let mut config = env.config();
    config.handler_blocking_after = Duration::from_millis(500);
    let rt = env.builder(config).handler(BlocksEagerly).started().await;
    env.produce_all(&["x".to_owned()], 1).await;
    wait_for("handled", || rt.stats().handled == 1).await;
    rt.shutdown().await.unwrap();
    assert_eq!(counter(m::HANDLER_BLOCKING, env.topic()), 1);
    assert_eq!(events(env.topic(), "blocking its thread").len(), 1);
}

//! The dead-letter flood breaker: a bad deploy (every record fails) dead-letters exactly the
//! threshold and then pauses the partition, its records staying in the topic; it resumes after
//! the cool-down (one record tried) or at once on the operator's command, with nothing lost.
//! One global metrics recorder serves this binary, so every scenario has its own topic and
//! group (`names = …`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::recording::{counter, gauge, recorder};
use common::*;
use sidetrack::config::{BreakerConfig, Ordering as RecordOrdering, RetryConfig};
use sidetrack::dead_letter::{
    BreakerAlert, BreakerTransition, DeadLetterAlert, DeadLetterNotifier, NotifyError,
};
use sidetrack::metrics as m;
use sidetrack::testing::wait_until;
use sidetrack::{Config, Context, Handler, HandlerError, Message, Tier};

fn breaker_gauge(topic: &str, partition: i32) -> Option<f64> {
    gauge(
        m::DEAD_LETTER_BREAKER_OPEN,
        &[("topic", topic), ("partition", &partition.to_string())],
    )
}

/// One handler call: (topic, partition, offset, key, succeeded).
type Call = (String, i32, i64, String, bool);

/// A deploy that is bad (every record fails, on `bad_partition` only if set) until `fixed`.
#[derive(Clone, Default)]
struct Deploy {
    fixed: Arc<AtomicBool>,
    fixed_watch: Arc<tokio::sync::watch::Sender<bool>>,
    bad_partition: Option<i32>,
    retryable: bool,
    /// While bad, calls fail in groups of this barrier's size, all at once: that many records
    /// are in handler calls when the breaker trips.
    barrier: Option<Arc<tokio::sync::Barrier>>,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl Deploy {
    fn fix(&self) {
        self.fixed.store(true, Ordering::SeqCst);
        self.fixed_watch.send_replace(true);
    }
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
    fn handled_keys(&self) -> BTreeSet<String> {
        self.calls()
            .into_iter()
            .filter(|c| c.4)
            .map(|c| c.3)
            .collect()
    }
}

impl Handler for Deploy {
    async fn handle(&self, msg: &Message, _cx: &Context) -> Result<(), HandlerError> {
        // Lets other records of the partition start meanwhile (`key` ordering).
        tokio::task::yield_now().await;
        let bad = !self.fixed.load(Ordering::SeqCst)
            && self.bad_partition.is_none_or(|p| p == msg.partition());
        if let (true, Some(barrier)) = (bad, &self.barrier) {
            // A call started after the last full group waits for the fix instead.
            let mut fixed = self.fixed_watch.subscribe();
            tokio::select! {
                _ = barrier.wait() => {}
                _ = fixed.wait_for(|f| *f) => {}
            }
        }
        let key = String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned();
        self.calls.lock().unwrap().push((
            msg.topic().to_owned(),
            msg.partition(),
            msg.offset(),
            key,
            !bad,
        ));
        match (bad, self.retryable) {
            (false, _) => Ok(()),
            (true, true) => Err(HandlerError::retryable("bad deploy")),
            (true, false) => Err(HandlerError::permanent("bad deploy")),
        }
    }
}

/// Collects breaker alerts.
#[derive(Clone, Default)]
struct Alerts(Arc<Mutex<Vec<BreakerAlert>>>);

impl Alerts {
    fn all(&self) -> Vec<BreakerAlert> {
        self.0.lock().unwrap().clone()
    }
    fn count(&self, transition: BreakerTransition) -> usize {
        self.all()
            .iter()
            .filter(|a| a.transition == transition)
            .count()
    }
}

impl DeadLetterNotifier for Alerts {
    fn name(&self) -> &str {
        "breaker-test"
    }
    async fn notify(&self, _: &DeadLetterAlert) -> Result<(), NotifyError> {
        Ok(())
    }
    async fn notify_breaker(&self, alert: &BreakerAlert) -> Result<(), NotifyError> {
        self.0.lock().unwrap().push(alert.clone());
        Ok(())
    }
}

const THRESHOLD: u32 = 10;

fn config_with_breaker(env: &Env, cool_down: Duration) -> Config {
    let mut c = env.config();
    c.dead_letter.breaker = BreakerConfig {
        enabled: true,
        consecutive: THRESHOLD,
        window: 200,
        window_dead_letters: 200,
        cool_down,
        max_cool_down: cool_down,
    };
    c
}

/// Produces `n` records to `partition`, keys and payloads `{prefix}-{i}` (or `keys(i)`).
async fn produce(
    env: &Env,
    partition: i32,
    n: usize,
    key: impl Fn(usize) -> String,
) -> Vec<(String, i64)> {
    let producer = env.producer();
    let mut out = Vec::new();
    for i in 0..n {
        let k = key(i);
        let payload = format!("{k}#{i}");
        let (_, offset) = env
            .produce(
                &producer,
                env.topic(),
                Some(partition),
                Some(k.as_bytes()),
                Some(payload.as_bytes()),
                &[],
            )
            .await
            .unwrap();
        out.push((k, offset));
    }
    out
}

/// Source offsets of the DLQ's records, per source partition.
async fn dead_lettered(env: &Env) -> BTreeMap<i32, Vec<i64>> {
    let mut out: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for r in env.read_all(&env.dlq()).await {
        let (_, e) = r.envelope().unwrap();
        out.entry(e.original_partition)
            .or_default()
            .push(e.original_offset);
    }
    for v in out.values_mut() {
        v.sort();
    }
    out
}

async fn committed_becomes(env: &Env, partition: i32, want: i64) -> bool {
    let (env, group, topic) = (env.clone(), env.group().to_owned(), env.topic().to_owned());
    wait_until(WAIT, || {
        let (env, group, topic) = (env.clone(), group.clone(), topic.clone());
        async move { env.committed_offset(&group, &topic, partition).await == Some(want) }
    })
    .await
}

/// A bad deploy on partition 0: exactly the threshold is dead-lettered, then the partition is
/// paused (gauge 1, alert, the committed offset at the first record not dead-lettered) while
/// partition 1 keeps flowing. The operator's command resumes it at once, and every remaining
/// record is handled.
async fn a_bad_deploy_is_held_until_the_operator_closes_the_breaker(env: Env) {
    recorder();
    let deploy = Deploy {
        bad_partition: Some(0),
        ..Deploy::default()
    };
    let alerts = Alerts::default();
    // A cool-down far beyond the test: only the operator resumes the partition.
    let config = config_with_breaker(&env, Duration::from_secs(3600));
    let bad = produce(&env, 0, 40, |i| format!("a-{i}")).await;
    let rt = env
        .builder(config)
        .handler(deploy.clone())
        .dead_letter_notifier(alerts.clone())
        .started()
        .await;
    let topic = env.topic().to_owned();
    wait_for("partition 0's breaker open", || {
        rt.open_breakers() == vec![(topic.clone(), 0)]
    })
    .await;
    // Partition 1 flows while partition 0 is held.
    let good = produce(&env, 1, 20, |i| format!("b-{i}")).await;
    wait_for("partition 1 handled", || {
        deploy.calls().iter().filter(|c| c.1 == 1 && c.4).count() == good.len()
    })
    .await;
    wait_for("the threshold acknowledged on the DLQ", || {
        rt.stats().total_dead_lettered() == u64::from(THRESHOLD)
    })
    .await;
    let first_kept = bad[THRESHOLD as usize].1;
    assert!(
        committed_becomes(&env, 0, first_kept).await,
        "committed up to the first record not dead-lettered"
    );
    // Nothing of partition 0 past the threshold was tried, nothing more dead-lettered.
    let tried: Vec<i64> = deploy
        .calls()
        .iter()
        .filter(|c| c.1 == 0)
        .map(|c| c.2)
        .collect();
    let first: Vec<i64> = bad[..THRESHOLD as usize].iter().map(|b| b.1).collect();
    assert_eq!(tried, first);
    let dlq = dead_lettered(&env).await;
    assert_eq!(dlq.get(&0), Some(&first));
    assert_eq!(dlq.get(&1), None);
    assert_eq!(breaker_gauge(&topic, 0), Some(1.0));
    assert_eq!(breaker_gauge(&topic, 1), Some(0.0));
    // Paused in the client, not merely idle.
    let group = env.group().to_owned();
    wait_for("partition 0 paused", || {
        gauge(m::PARTITIONS_PAUSED, &[("group", &group)]) == Some(1.0)
    })
    .await;
    assert_eq!(
        counter(m::DEAD_LETTER_BREAKER_TRIPS, &[("topic", &topic)]),
        1
    );
    wait_for("the open alert", || {
        alerts.count(BreakerTransition::Opened) == 1
    })
    .await;
    let opened = alerts.all()[0].clone();
    assert_eq!(
        (opened.topic.as_str(), opened.partition, opened.offset),
        (topic.as_str(), 0, Some(first[THRESHOLD as usize - 1]))
    );
    assert_eq!(opened.consecutive, THRESHOLD);
    assert_eq!(opened.limits, (THRESHOLD, 200, 200));
    assert!(opened.text().contains("OPEN"), "{}", opened.text());
    assert!(
        !rt.close_breaker(&topic, 1),
        "partition 1's breaker is closed"
    );
    assert!(!rt.close_breaker("elsewhere", 0));

    // The fix is deployed; the operator resumes partition 0 without waiting an hour.
    deploy.fix();
    assert!(rt.close_breaker(&topic, 0));
    wait_for("partition 0's remaining records handled", || {
        deploy.calls().iter().filter(|c| c.1 == 0 && c.4).count() == bad.len() - first.len()
    })
    .await;
    assert!(rt.open_breakers().is_empty());
    assert_eq!(breaker_gauge(&topic, 0), Some(0.0));
    assert_eq!(gauge(m::PARTITIONS_PAUSED, &[("group", &group)]), Some(0.0));
    wait_for("the close alert", || {
        alerts.count(BreakerTransition::ClosedByOperator) == 1
    })
    .await;
    let stats = rt.shutdown().await.unwrap();
    assert_eq!(stats.total_dead_lettered(), u64::from(THRESHOLD));
    assert_eq!(stats.handled as usize, bad.len() - first.len() + good.len());
    // Read back: every record of partition 0 is on the DLQ or handled, exactly once each.
    let handled: Vec<i64> = deploy
        .calls()
        .iter()
        .filter(|c| c.1 == 0 && c.4)
        .map(|c| c.2)
        .collect();
    let rest: Vec<i64> = bad[THRESHOLD as usize..].iter().map(|b| b.1).collect();
    assert_eq!(handled, rest);
    assert_eq!(dead_lettered(&env).await.get(&0), Some(&first));
    let end = bad.last().unwrap().1 + 1;
    assert!(
        committed_becomes(&env, 0, end).await,
        "committed to the end"
    );
}

on_every_broker!(
    a_bad_deploy_is_held_until_the_operator_closes_the_breaker,
    2,
    a_bad_deploy_is_held_until_the_operator_closes_the_breaker,
    names = ("breaker-operator", "breaker-operator-g")
);

/// After the cool-down one record is tried; once the deploy is fixed it is handled, the
/// breaker closes, and every remaining record is handled. A record tried while the deploy is
/// still bad (on a slow machine) is dead-lettered and opens the breaker again: each such
/// reopening adds exactly one dead letter, and nothing is lost either way.
async fn after_the_cool_down_one_record_is_tried_and_closes_the_breaker(env: Env) {
    recorder();
    let deploy = Deploy::default();
    let alerts = Alerts::default();
    let config = config_with_breaker(&env, Duration::from_millis(1500));
    let sent = produce(&env, 0, 30, |i| format!("c-{i}")).await;
    let rt = env
        .builder(config)
        .handler(deploy.clone())
        .dead_letter_notifier(alerts.clone())
        .started()
        .await;
    let topic = env.topic().to_owned();
    wait_for("the breaker open", || !rt.open_breakers().is_empty()).await;
    deploy.fix();
    wait_for("the breaker closed by the record tried", || {
        alerts.count(BreakerTransition::Closed) == 1
    })
    .await;
    let reopened = alerts.count(BreakerTransition::Reopened);
    let dead = THRESHOLD as usize + reopened;
    wait_for("every other record handled", || {
        deploy.handled_keys().len() == sent.len() - dead
    })
    .await;
    assert!(rt.open_breakers().is_empty());
    assert_eq!(breaker_gauge(&topic, 0), Some(0.0));
    assert_eq!(alerts.count(BreakerTransition::ClosedByOperator), 0);
    let stats = rt.shutdown().await.unwrap();
    assert_eq!(stats.total_dead_lettered() as usize, dead);
    // The first `dead` records on the DLQ, every later one handled: nothing lost or skipped.
    let offsets: Vec<i64> = sent.iter().map(|s| s.1).collect();
    assert_eq!(
        dead_lettered(&env).await.get(&0),
        Some(&offsets[..dead].to_vec())
    );
    let handled: BTreeSet<String> = sent[dead..].iter().map(|s| s.0.clone()).collect();
    assert_eq!(deploy.handled_keys(), handled);
    let closed = alerts
        .all()
        .into_iter()
        .find(|a| a.transition == BreakerTransition::Closed)
        .unwrap();
    assert_eq!(closed.offset, Some(offsets[dead]));
    assert!(committed_becomes(&env, 0, offsets.last().unwrap() + 1).await);
}

on_every_broker!(
    after_the_cool_down_one_record_is_tried_and_closes_the_breaker,
    1,
    after_the_cool_down_one_record_is_tried_and_closes_the_breaker,
    names = ("breaker-cool-down", "breaker-cool-down-g")
);

/// `key` ordering, several records in handler calls at once: the records still in flight when
/// the breaker trips are not dead-lettered (exactly the threshold is), the committed offset
/// stops at the first of them, and after the operator's command they are handled, each key's
/// records in offset order.
async fn key_ordering_holds_the_records_in_flight(env: Env) {
    recorder();
    let deploy = Deploy {
        barrier: Some(Arc::new(tokio::sync::Barrier::new(8))),
        ..Deploy::default()
    };
    let mut config = config_with_breaker(&env, Duration::from_secs(3600));
    config.ordering = RecordOrdering::Key;
    config.max_in_flight = 8;
    // 20 keys, 8 records at once: the breaker trips on the second group of 8, whose other 6
    // records are in flight and must not be dead-lettered.
    let sent = produce(&env, 0, 60, |i| format!("k{}", i % 20)).await;
    let rt = env.builder(config).handler(deploy.clone()).started().await;
    let topic = env.topic().to_owned();
    wait_for("the breaker open", || !rt.open_breakers().is_empty()).await;
    wait_for("the threshold acknowledged on the DLQ", || {
        rt.stats().total_dead_lettered() == u64::from(THRESHOLD)
    })
    .await;
    let dlq = dead_lettered(&env).await.remove(&0).unwrap_or_default();
    assert_eq!(dlq.len(), THRESHOLD as usize, "{dlq:?}");
    let offsets: Vec<i64> = sent.iter().map(|s| s.1).collect();
    let first_kept = *offsets.iter().find(|o| !dlq.contains(o)).unwrap();
    // The 6 others of the second group failed too, and were held.
    wait_for("16 calls failed", || deploy.calls().len() == 16).await;
    assert!(
        committed_becomes(&env, 0, first_kept).await,
        "committed up to the first record not dead-lettered ({first_kept})"
    );
    deploy.fix();
    assert!(rt.close_breaker(&topic, 0));
    let kept: BTreeSet<i64> = offsets
        .iter()
        .copied()
        .filter(|o| !dlq.contains(o))
        .collect();
    let handled =
        || -> BTreeSet<i64> { deploy.calls().iter().filter(|c| c.4).map(|c| c.2).collect() };
    let all = wait_until(WAIT, || std::future::ready(handled().is_superset(&kept))).await;
    assert!(all, "handled {:?}, want {kept:?}", handled());
    // Handled besides: only records dead-lettered past the first one held, which the seek back
    // to it reads again (at-least-once, as after a crash; see `BreakerConfig`).
    let again: BTreeSet<i64> = handled().difference(&kept).copied().collect();
    assert!(
        again.iter().all(|o| dlq.contains(o) && *o > first_kept),
        "{again:?}"
    );
    let stats = rt.shutdown().await.unwrap();
    assert_eq!(stats.total_dead_lettered(), u64::from(THRESHOLD));
    assert_eq!(dead_lettered(&env).await.remove(&0).unwrap(), dlq);
    // Each key's successful calls in offset order.
    let mut by_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for c in deploy.calls().into_iter().filter(|c| c.4) {
        by_key.entry(c.3).or_default().push(c.2);
    }
    for (key, offsets) in by_key {
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "{key}: {offsets:?}"
        );
    }
    assert!(committed_becomes(&env, 0, offsets.last().unwrap() + 1).await);
}

on_every_broker!(
    key_ordering_holds_the_records_in_flight,
    1,
    key_ordering_holds_the_records_in_flight,
    names = ("breaker-key", "breaker-key-g")
);

/// Records that exhaust their retries are dead-lettered by the last retry tier: its
/// partitions have a breaker too, and the records stay in the retry topic while it is open.
async fn the_last_retry_tier_has_a_breaker_too(env: Env) {
    recorder();
    let deploy = Deploy {
        retryable: true,
        ..Deploy::default()
    };
    let mut config = config_with_breaker(&env, Duration::from_secs(3600));
    config.retry = RetryConfig::tiers([Tier::new(Duration::from_millis(200), 1)]);
    let sent = produce(&env, 0, 30, |i| format!("r-{i}")).await;
    let rt = env.builder(config).handler(deploy.clone()).started().await;
    let tier = env.retry("200ms");
    wait_for("the retry tier's breaker open", || {
        rt.open_breakers() == vec![(tier.clone(), 0)]
    })
    .await;
    wait_for("every record on the retry tier", || {
        rt.stats().total_retried() == sent.len() as u64
    })
    .await;
    wait_for("the threshold acknowledged on the DLQ", || {
        rt.stats().total_dead_lettered() == u64::from(THRESHOLD)
    })
    .await;
    assert_eq!(breaker_gauge(&tier, 0), Some(1.0));
    assert_eq!(breaker_gauge(env.topic(), 0), Some(0.0));
    // The source partition is done (everything went to the tier), the tier holds the rest.
    let dlq = dead_lettered(&env).await.remove(&0).unwrap_or_default();
    assert_eq!(dlq.len(), THRESHOLD as usize);
    deploy.fix();
    assert!(rt.close_breaker(&tier, 0));
    wait_for("the rest handled from the retry tier", || {
        deploy.handled_keys().len() == sent.len() - THRESHOLD as usize
    })
    .await;
    let stats = rt.shutdown().await.unwrap();
    assert_eq!(stats.total_dead_lettered(), u64::from(THRESHOLD));
    let on_dlq: BTreeSet<i64> = dlq.into_iter().collect();
    let handled: BTreeSet<String> = sent
        .iter()
        .filter(|s| !on_dlq.contains(&s.1))
        .map(|s| s.0.clone())
        .collect();
    assert_eq!(deploy.handled_keys(), handled);
}

on_every_broker!(
    the_last_retry_tier_has_a_breaker_too,
    1,
    the_last_retry_tier_has_a_breaker_too,
    names = ("breaker-tier", "breaker-tier-g")
);

/// The webhook gets the breaker's events at once (not aggregated into a window), under their
/// own key, with a readable text.
#[cfg(feature = "webhook")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_is_told_when_the_breaker_opens_and_closes() {
    recorder();
    let env = Env::embedded_named("breaker-hook", "breaker-hook-g", 1);
    let (addr, bodies) = http_server(Reply::Ok).await;
    let mut config = config_with_breaker(&env, Duration::from_secs(3600));
    config.alerts.webhook = Some(format!("http://{addr}/hook"));
    // Dead-letter alerts only at the end of a long window: the breaker's come first.
    config.alerts.window = Duration::from_secs(3600);
    let deploy = Deploy::default();
    produce(&env, 0, 20, |i| format!("h-{i}")).await;
    let rt = env.builder(config).handler(deploy.clone()).started().await;
    let breaker_bodies = || -> Vec<serde_json::Value> {
        bodies
            .lock()
            .unwrap()
            .iter()
            .map(|b| serde_json::from_str::<serde_json::Value>(b).unwrap())
            .filter(|j| j.get("sidetrack_breaker").is_some())
            .collect()
    };
    wait_for("the webhook told of the open breaker", || {
        breaker_bodies().len() == 1
    })
    .await;
    let open = &breaker_bodies()[0];
    assert_eq!(open["sidetrack_breaker"]["transition"], "opened");
    assert_eq!(open["sidetrack_breaker"]["topic"], "breaker-hook");
    assert_eq!(open["sidetrack_breaker"]["partition"], 0);
    assert_eq!(open["sidetrack_breaker"]["consecutive"], THRESHOLD);
    assert_eq!(open["sidetrack_breaker"]["offset"], THRESHOLD - 1);
    let text = open["text"].as_str().unwrap();
    assert!(
        text.contains("dead-letter breaker OPEN for `breaker-hook`[0]"),
        "{text}"
    );
    deploy.fix();
    assert_eq!(rt.reset_breakers(), 1);
    wait_for("the webhook told of the close", || {
        breaker_bodies().len() == 2
    })
    .await;
    assert_eq!(
        breaker_bodies()[1]["sidetrack_breaker"]["transition"],
        "closed_by_operator"
    );
    assert_eq!(rt.reset_breakers(), 0);
    rt.shutdown().await.unwrap();
}

/// The breaker's state lives with the assignment: a process stopped while it is open commits
/// up to the first record not dead-lettered, and the next owner of the partition starts
/// closed — with the deploy still bad it dead-letters the threshold once more, then trips.
async fn the_next_owner_starts_closed(env: Env) {
    recorder();
    let sent = produce(&env, 0, 40, |i| format!("n-{i}")).await;
    let offsets: Vec<i64> = sent.iter().map(|s| s.1).collect();
    let config = config_with_breaker(&env, Duration::from_secs(3600));
    let first = Deploy::default();
    let rt = env
        .builder(config.clone())
        .handler(first.clone())
        .started()
        .await;
    wait_for("the breaker open", || !rt.open_breakers().is_empty()).await;
    wait_for("the threshold acknowledged on the DLQ", || {
        rt.stats().total_dead_lettered() == u64::from(THRESHOLD)
    })
    .await;
    rt.shutdown().await.unwrap();
    assert!(committed_becomes(&env, 0, offsets[THRESHOLD as usize]).await);
    let second = Deploy::default();
    let rt = env.builder(config).handler(second.clone()).started().await;
    let topic = env.topic().to_owned();
    wait_for("the next owner's breaker open", || {
        rt.open_breakers() == vec![(topic.clone(), 0)]
    })
    .await;
    wait_for("the threshold acknowledged on the DLQ again", || {
        rt.stats().total_dead_lettered() == u64::from(THRESHOLD)
    })
    .await;
    // It began where the first stopped: nothing skipped, nothing dead-lettered twice.
    let tried: Vec<i64> = second.calls().iter().map(|c| c.2).collect();
    assert_eq!(tried, offsets[THRESHOLD as usize..2 * THRESHOLD as usize]);
    rt.shutdown().await.unwrap();
    assert_eq!(
        dead_lettered(&env).await.get(&0),
        Some(&offsets[..2 * THRESHOLD as usize].to_vec())
    );
    assert!(committed_becomes(&env, 0, offsets[2 * THRESHOLD as usize]).await);
}

on_every_broker!(
    the_next_owner_starts_closed,
    1,
    the_next_owner_starts_closed,
    names = ("breaker-owner", "breaker-owner-g")
);

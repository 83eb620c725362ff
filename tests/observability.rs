//! Metrics and dead-letter alerts. One global debugging recorder serves the whole binary, so
//! every test uses its own topic and group and reads only its own labels. The scenarios whose
//! figures come from the broker (offsets, watermarks, timestamps) also run on a real broker and
//! on kfake (`on_every_broker!`, with names made unique there).

mod common;

use std::time::Duration;

use common::recording::*;
use common::*;
use sidetrack::config::RetryConfig;
use sidetrack::metrics as m;
use sidetrack::{HandlerError, Tier};

fn snapshotter() -> &'static Recording {
    recorder()
}

async fn outcome_counters_match_the_records_sent(cluster: Env) {
    snapshotter();
    let (topic, group) = (cluster.topic(), cluster.group());
    let recorder = Recorder::new(|m| match m.payload_str()? {
        p if p.starts_with("perm") => Err(HandlerError::permanent("no")),
        p if p.starts_with("flaky") && m.attempt() == 1 => Err(HandlerError::retryable("later")),
        "not json" => m.json::<u32>().map(|_| ()),
        _ => Ok(()),
    });
    let rt = cluster
        .builder(cluster.config())
        .handler(recorder)
        .started()
        .await;
    let mut sent: Vec<String> = (0..10).map(|i| format!("ok-{i}")).collect();
    sent.extend(["perm-1", "perm-2", "not json", "flaky-1", "flaky-2"].map(String::from));
    cluster.produce_to(topic, &sent, 2).await;
    wait_for("all resolved", || {
        let s = rt.stats();
        s.handled == 12 && s.total_dead_lettered() == 3
    })
    .await;
    rt.shutdown().await.unwrap();

    let src = [("source", topic)];
    assert_eq!(counter(m::RECORDS_HANDLED, &src), 12);
    assert_eq!(
        counter(m::RETRIES_SCHEDULED, &[("source", topic), ("tier", "0")]),
        2
    );
    assert_eq!(
        counter(
            m::DEAD_LETTERED,
            &[("source", topic), ("reason", "permanent")]
        ),
        2
    );
    assert_eq!(
        counter(m::DEAD_LETTERED, &[("source", topic), ("reason", "poison")]),
        1
    );
    assert_eq!(counter(m::HANDOFF_FAILURES, &src), 0);
    assert_eq!(
        counter(m::RECORDS_CONSUMED, &[("group", group), ("topic", topic)]),
        15
    );
    let retry_topic = format!("{topic}.{group}.retry.200ms");
    assert_eq!(
        counter(m::RECORDS_CONSUMED, &[("topic", retry_topic.as_str())]),
        2
    );
    // Keys are the payloads: key + payload bytes.
    let bytes: u64 = sent.iter().map(|p| 2 * p.len() as u64).sum();
    assert_eq!(
        counter(m::BYTES_CONSUMED, &[("group", group), ("topic", topic)]),
        bytes
    );
    // Handlers that return without waiting are timed one call in 16 (no clock reads for the
    // others); these return at once.
    let processing = histogram(
        m::PROCESSING_SECONDS,
        &[("source", topic), ("outcome", "handled")],
    );
    assert!((1..=12).contains(&processing.len()), "{}", processing.len());
    let lateness = histogram(
        m::RETRY_LATENESS_SECONDS,
        &[("topic", retry_topic.as_str())],
    );
    assert_eq!(lateness.len(), 2);
    assert!(lateness.iter().all(|l| *l >= 0.0));
    // Retried records also report latency from their original timestamp.
    let original = histogram(
        m::END_TO_END_SECONDS,
        &[("topic", retry_topic.as_str()), ("from", "original")],
    );
    assert_eq!(original.len(), 2);
    assert!(original.iter().all(|l| *l >= 0.2), "{original:?}");
    assert_eq!(gauge(m::RECORDS_IN_FLIGHT, &[("group", group)]), Some(0.0));
}

async fn end_to_end_latency_counts_from_the_record_timestamp(cluster: Env) {
    snapshotter();
    let topic = cluster.topic();
    let rt = cluster
        .builder(cluster.config())
        .handler(Recorder::new(|_| Ok(())))
        .started()
        .await;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap())
        .create()
        .unwrap();
    let an_hour_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        - 3_600_000;
    producer
        .send(
            FutureRecord::<(), _>::to(topic)
                .payload("old")
                .timestamp(an_hour_ago),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    wait_for("handled", || rt.stats().handled == 1).await;
    rt.shutdown().await.unwrap();
    let e2e = histogram(
        m::END_TO_END_SECONDS,
        &[("topic", topic), ("from", "record")],
    );
    assert_eq!(e2e.len(), 1);
    assert!(e2e[0] >= 3600.0, "end-to-end latency {}s", e2e[0]);
}

async fn lag_drains_to_zero_and_shows_records_behind_a_paused_retry_partition(cluster: Env) {
    snapshotter();
    let (topic, group) = (cluster.topic(), cluster.group());
    let mut cfg = cluster.config();
    cfg.metrics.lag_interval = Duration::from_millis(200);
    cfg.retry = RetryConfig::tiers([Tier::new(Duration::from_secs(4), 1)]);
    let recorder = Recorder::new(|m| match m.payload_str()? {
        p if p.starts_with("slow") && m.attempt() == 1 => Err(HandlerError::retryable("later")),
        p if p.starts_with("ok") => {
            std::thread::sleep(Duration::from_millis(20));
            Ok(())
        }
        _ => Ok(()),
    });
    // A backlog before start, handled slowly enough for the sampler to see it.
    let ok: Vec<String> = (0..30).map(|i| format!("ok-{i}")).collect();
    cluster.produce_to(topic, &ok, 0).await;
    let rt = cluster.builder(cfg).handler(recorder).started().await;
    let part0 = [("group", group), ("topic", topic), ("partition", "0")];
    wait_for("backlog visible as lag", || {
        gauge(m::CONSUMER_LAG, &part0).is_some_and(|l| l > 0.0)
    })
    .await;
    wait_for("backlog handled", || rt.stats().handled == 30).await;
    wait_for("lag drained to 0", || {
        gauge(m::CONSUMER_LAG, &part0) == Some(0.0)
    })
    .await;
    assert_eq!(
        gauge(m::CONSUMER_MAX_LAG, &[("group", group), ("topic", topic)]),
        Some(0.0)
    );

    // Five records go to the 4 s tier; its partition is paused on the first with four behind.
    let slow: Vec<String> = (0..5).map(|i| format!("slow-{i}")).collect();
    cluster.produce_to(topic, &slow, 0).await;
    let retry_topic = format!("{topic}.{group}.retry.4s");
    let retry_group = format!("{group}.retry");
    let retry = [
        ("group", retry_group.as_str()),
        ("topic", retry_topic.as_str()),
    ];
    wait_for("retry lag of 5 while paused", || {
        gauge(m::CONSUMER_MAX_LAG, &retry) == Some(5.0)
    })
    .await;
    assert_eq!(
        gauge(m::PARTITIONS_PAUSED, &[("group", retry_group.as_str())]),
        Some(1.0)
    );
    assert_eq!(rt.stats().handled, 30, "nothing handled before it is due");
    wait_for("retries handled", || rt.stats().handled == 35).await;
    wait_for("retry lag back to 0", || {
        gauge(m::CONSUMER_MAX_LAG, &retry) == Some(0.0)
    })
    .await;
    assert_eq!(
        gauge(m::PARTITIONS_PAUSED, &[("group", retry_group.as_str())]),
        Some(0.0)
    );
    rt.shutdown().await.unwrap();
}

async fn dead_letters_are_aggregated_into_one_alert_per_window(cluster: Env) {
    snapshotter();
    let (topic, group) = (cluster.topic(), cluster.group());
    let collect = Collect::default();
    let mut cfg = cluster.config();
    cfg.alerts.window = Duration::from_secs(600); // only the flush at shutdown fires
    cfg.alerts.max_examples = 2;
    let rt = cluster
        .builder(cfg)
        .handler(Recorder::new(|m| match m.payload_str()? {
            p if p.starts_with("bad") => Err(HandlerError::permanent(format!("{p} rejected"))),
            _ => Ok(()),
        }))
        .dead_letter_notifier(collect.clone())
        .started()
        .await;
    let sent: Vec<String> = ["bad-1", "ok", "bad-2", "bad-3"].map(String::from).to_vec();
    let positions = cluster.produce_to(topic, &sent, 0).await;
    wait_for("3 dead letters", || rt.stats().total_dead_lettered() == 3).await;
    let checked = now_ms();
    // Windows are epoch-aligned: one that ended (plus the grace: the hand-off timeout and a
    // second) before this point may already have been sent; no other.
    let grace = 1_500;
    for a in collect.0.lock().unwrap().iter() {
        assert!(a.window_end_ms + 1 + grace <= checked, "sent early: {a:?}");
    }
    rt.shutdown().await.unwrap();
    let alerts = collect.0.lock().unwrap().clone();
    // One alert per window the DLQ records' timestamps fall in: almost always one, two when
    // the records straddle a 10-minute boundary.
    let dlq = cluster.read_all(&format!("{topic}.{group}.dlq")).await;
    let windows: std::collections::BTreeSet<i64> = dlq
        .iter()
        .map(|r| r.timestamp.unwrap().div_euclid(600_000))
        .collect();
    assert_eq!(alerts.len(), windows.len(), "{alerts:?}");
    assert_eq!(alerts.iter().map(|a| a.count).sum::<u64>(), 3);
    let a = &alerts[0];
    assert_eq!((a.topic.as_str(), a.group.as_str()), (topic, group));
    assert_eq!(a.dead_letter_topic, format!("{topic}.{group}.dlq"));
    assert_eq!(a.window_start_ms, windows.first().unwrap() * 600_000);
    assert_eq!(a.window_end_ms, a.window_start_ms + 600_000 - 1);
    assert!(!a.follow_up);
    assert_eq!(a.examples[0].offset, positions[0].1);
    assert_eq!(a.examples[0].key.as_deref(), Some("bad-1"));
    assert_eq!(a.examples[0].error, "bad-1 rejected");
    assert_eq!(a.examples[0].dlq_offset, Some(0));
    assert!(a
        .inspect_command
        .contains(&format!("--topic {topic}.{group}.dlq")));
    if windows.len() == 1 {
        assert_eq!(a.count, 3);
        assert_eq!(a.by_reason, vec![("permanent".to_string(), 3)]);
        assert_eq!(a.examples.len(), 2);
        assert!(a.text().contains("3 records"));
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

on_every_broker!(
    outcome_counters_match_the_records_sent,
    2,
    outcome_counters_match_the_records_sent,
    names = ("obs-outcomes", "g-outcomes")
);
on_every_broker!(
    end_to_end_latency_counts_from_the_record_timestamp,
    1,
    end_to_end_latency_counts_from_the_record_timestamp,
    names = ("obs-e2e", "g-e2e")
);
on_every_broker!(
    lag_drains_to_zero_and_shows_records_behind_a_paused_retry_partition,
    1,
    lag_drains_to_zero_and_shows_records_behind_a_paused_retry_partition,
    names = ("obs-lag", "g-lag")
);
on_every_broker!(
    dead_letters_are_aggregated_into_one_alert_per_window,
    1,
    dead_letters_are_aggregated_into_one_alert_per_window,
    names = ("obs-alert", "g-alert")
);

// The webhook tests count alerts per notifier over the whole binary, and the broker plays no
// part in them: embedded only.
#[cfg(feature = "webhook")]
mod webhook {
    use super::*;
    use sidetrack::Runtime;

    fn dlq_config(topic: &str, group: &str, url: String) -> sidetrack::Config {
        let mut cfg = config_for(topic, group);
        cfg.alerts.webhook = Some(url);
        cfg.alerts.log = false;
        cfg
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn webhook_receives_one_aggregated_alert() {
        snapshotter();
        let (topic, group) = ("obs-hook", "g-hook");
        let cluster = cluster_with(topic, 1);
        let (addr, bodies) = http_server(Reply::Ok).await;
        let mut cfg = dlq_config(topic, group, format!("http://{addr}/hook"));
        cfg.alerts.window = Duration::from_secs(600);
        let rt = Runtime::builder(cfg)
            .embedded(&cluster)
            .handler(Recorder::new(|_| Err(HandlerError::permanent("nope"))))
            .started()
            .await;
        let sent: Vec<String> = (0..4).map(|i| format!("k-{i}")).collect();
        produce_to(&cluster, topic, &sent, 0).await;
        wait_for("4 dead letters", || rt.stats().total_dead_lettered() == 4).await;
        rt.shutdown().await.unwrap();
        let bodies = bodies.lock().unwrap().clone();
        // One aggregated alert per 10-minute window: two if the records straddle a boundary.
        assert!(matches!(bodies.len(), 1 | 2), "{bodies:?}");
        let json: Vec<serde_json::Value> = bodies
            .iter()
            .map(|b| serde_json::from_str(b).unwrap())
            .collect();
        let total: u64 = json
            .iter()
            .map(|j| j["sidetrack"]["count"].as_u64().unwrap())
            .sum();
        assert_eq!(total, 4);
        let json = &json[0];
        if bodies.len() == 1 {
            assert!(json["text"].as_str().unwrap().contains("4 records"));
        }
        let a = &json["sidetrack"];
        assert_eq!(a["topic"], topic);
        assert_eq!(a["group"], group);
        assert_eq!(a["examples"][0]["key"], "k-0");
        assert_eq!(a["examples"][0]["reason"], "permanent");
        assert_eq!(a["examples"][0]["error"], "nope");
        assert!(a["replay_command"].as_str().unwrap().contains("dlq replay"));
        assert_eq!(
            counter(m::ALERTS_SENT, &[("notifier", "webhook")]),
            bodies.len() as u64
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failing_or_hanging_webhooks_do_not_stall_consumption() {
        snapshotter();
        for (n, reply) in [Reply::ServerError, Reply::Hang].into_iter().enumerate() {
            let (topic, group) = (format!("obs-hook-bad-{n}"), format!("g-hook-bad-{n}"));
            let cluster = cluster_with(&topic, 1);
            let (addr, bodies) = http_server(reply).await;
            let mut cfg = dlq_config(&topic, &group, format!("http://{addr}/hook"));
            cfg.alerts.window = Duration::from_millis(200);
            cfg.alerts.timeout = Duration::from_secs(1);
            let rt = Runtime::builder(cfg)
                .embedded(&cluster)
                .handler(Recorder::new(|m| match m.payload_str()? {
                    p if p.starts_with("bad") => Err(HandlerError::permanent("nope")),
                    _ => Ok(()),
                }))
                .started()
                .await;
            produce_to(&cluster, &topic, &["bad-0".to_string()], 0).await;
            wait_for("the webhook was called", || {
                !bodies.lock().unwrap().is_empty()
            })
            .await;
            // Consumption goes on while the webhook fails or hangs.
            let more: Vec<String> = (0..50)
                .map(|i| format!("ok-{i}"))
                .chain(["bad-1".into()])
                .collect();
            produce_to(&cluster, &topic, &more, 0).await;
            wait_for("later records handled", || {
                let s = rt.stats();
                s.handled == 50 && s.total_dead_lettered() == 2
            })
            .await;
            let begun = std::time::Instant::now();
            rt.shutdown().await.unwrap();
            assert!(
                begun.elapsed() < Duration::from_secs(10),
                "{reply:?}: shutdown bounded"
            );
            wait_for("failure counted", || {
                counter(m::ALERT_FAILURES, &[("notifier", "webhook")]) >= (n as u64 + 1)
            })
            .await;
            // The DLQ holds both records regardless.
            let dlq = cluster
                .read_all(&format!("{topic}.{group}.dlq"))
                .await
                .unwrap();
            assert_eq!(dlq.len(), 2, "{reply:?}");
        }
    }
}

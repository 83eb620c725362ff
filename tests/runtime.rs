//! Scenario tests of the runtime on the embedded broker and, when configured, on a real broker
//! and on kfake (see `on_every_broker!` in `common`).

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use sidetrack::retry::headers as h;
use sidetrack::testing::{wait_until, Record};
use sidetrack::{Error, HandlerError, Header, Reason};

fn payloads(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn text(r: &Record) -> String {
    String::from_utf8_lossy(r.payload.as_deref().unwrap_or_default()).into_owned()
}

async fn success_commits_offsets(cluster: Env) {
    let recorder = Recorder::new(|_| Ok(()));
    let rt = cluster
        .builder(cluster.config())
        .handler(recorder.clone())
        .started()
        .await;
    let sent = cluster.produce_all(&payloads("ok", 20), 2).await;
    wait_for("20 handled", || rt.stats().handled == 20).await;
    let stats = rt.shutdown().await.unwrap();
    assert_eq!(stats.handled, 20);
    assert_eq!(stats.total_retried(), 0);
    assert_eq!(stats.total_dead_lettered(), 0);
    for p in 0..2 {
        let last = sent
            .iter()
            .filter(|(part, _)| *part == p)
            .map(|(_, o)| *o)
            .max()
            .unwrap();
        let committed = cluster
            .committed_offset(cluster.group(), cluster.topic(), p)
            .await;
        assert_eq!(committed, Some(last + 1), "partition {p}");
    }
    assert_eq!(recorder.count(), 20, "each record handled once");
}

async fn transient_failure_is_retried_via_tier_topic_then_succeeds(cluster: Env) {
    // "flaky" fails on its first attempt by panicking, then succeeds.
    let recorder = Recorder::new(|m| {
        if m.payload() == Some(b"flaky") && m.attempt() == 1 {
            panic!("simulated crash in handler");
        }
        Ok(())
    });
    let rt = cluster
        .builder(cluster.config())
        .handler(recorder.clone())
        .started()
        .await;
    cluster
        .produce_all(&["flaky".to_string(), "fine".to_string()], 0)
        .await;
    wait_for("both handled", || rt.stats().handled == 2).await;
    let stats = rt.shutdown().await.unwrap();
    assert_eq!(stats.retried, vec![1, 0]);
    assert_eq!(stats.total_dead_lettered(), 0);
    let attempts: Vec<u32> = recorder.by_payload()["flaky"]
        .iter()
        .map(|a| a.attempt)
        .collect();
    assert_eq!(attempts, vec![1, 2]);

    let tier = cluster.read_all(&cluster.retry("200ms")).await;
    assert_eq!(tier.len(), 1);
    let (_, env) = tier[0].envelope().unwrap();
    assert_eq!(env.attempts, 1);
    assert_eq!(sidetrack::outcome::error_kind_str(env.reason), "retryable");
    assert!(
        env.error
            .contains("handler panicked: simulated crash in handler"),
        "{}",
        env.error
    );
    assert!(env.due.is_some());
    assert!(cluster.read_all(&cluster.dlq()).await.is_empty());
}

async fn exhausted_retries_go_to_dlq_with_full_envelope(cluster: Env) {
    let recorder = Recorder::new(|_| Err(HandlerError::retryable("database unavailable")));
    let rt = cluster
        .builder(cluster.config())
        .handler(recorder.clone())
        .started()
        .await;
    let producer = cluster.producer();
    let (partition, offset) = cluster
        .produce(
            &producer,
            cluster.topic(),
            Some(0),
            Some(b"k1"),
            Some(b"doomed"),
            &[],
        )
        .await
        .unwrap();
    wait_for("dead-lettered", || rt.stats().total_dead_lettered() == 1).await;
    let stats = rt.shutdown().await.unwrap();
    // 1 delivery + 2 retries on tier 0 + 1 on tier 1 = 4 attempts.
    assert_eq!(stats.retried, vec![2, 1]);
    assert_eq!(stats.dead_lettered(Reason::Exhausted), 1);
    assert_eq!(recorder.count(), 4);

    let records = cluster.read_all(&cluster.dlq()).await;
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(r.header_str(h::VERSION), Some("1"));
    assert_eq!(r.header_str(h::ORIGINAL_TOPIC), Some(cluster.topic()));
    assert_eq!(
        r.header_str(h::ORIGINAL_PARTITION),
        Some(partition.to_string().as_str())
    );
    assert_eq!(
        r.header_str(h::ORIGINAL_OFFSET),
        Some(offset.to_string().as_str())
    );
    assert!(
        r.header_str(h::ORIGINAL_TIMESTAMP)
            .unwrap()
            .parse::<i64>()
            .unwrap()
            > 0
    );
    assert_eq!(r.header_str(h::GROUP), Some(cluster.group()));
    assert_eq!(r.header_str(h::ATTEMPTS), Some("4"));
    assert_eq!(r.header_str(h::ERROR_KIND), Some("exhausted"));
    assert_eq!(r.header_str(h::ERROR), Some("database unavailable"));
    assert_eq!(r.header_str(h::DUE), None, "no due time on the DLQ");
    let first_failure: i64 = r.header_str(h::FIRST_FAILURE).unwrap().parse().unwrap();
    let attempts = recorder.all();
    assert!(first_failure >= attempts[0].at_ms && first_failure <= attempts[1].at_ms);
    // Exactly one envelope: replaced, not appended, on each hop.
    assert_eq!(r.headers.iter().filter(|x| x.is(h::VERSION)).count(), 1);
    assert_eq!(r.key.as_deref(), Some(&b"k1"[..]));
    assert_eq!(
        cluster
            .committed_offset(cluster.group(), cluster.topic(), 0)
            .await,
        Some(offset + 1)
    );
}

async fn permanent_and_undecodable_go_to_dlq_at_once(cluster: Env) {
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Order {
        id: String,
        amount_cents: i64,
    }
    let recorder = Recorder::new(|m| {
        let order: Order = m.json()?;
        if order.amount_cents < 0 {
            return Err(HandlerError::permanent("negative amount"));
        }
        Ok(())
    });
    let rt = cluster
        .builder(cluster.config())
        .handler(recorder.clone())
        .started()
        .await;
    let sent = vec![
        r#"{"id":"a","amount_cents":-5}"#.to_string(),
        "{not json".to_string(),
        r#"{"id":"b","amount_cents":7}"#.to_string(),
    ];
    cluster.produce_all(&sent, 0).await;
    wait_for("two dead letters and one success", || {
        let s = rt.stats();
        s.total_dead_lettered() == 2 && s.handled == 1
    })
    .await;
    let stats = rt.shutdown().await.unwrap();
    assert_eq!(stats.total_retried(), 0);
    assert_eq!(stats.dead_lettered(Reason::Permanent), 1);
    assert_eq!(stats.dead_lettered(Reason::Poison), 1);
    assert_eq!(recorder.count(), 3, "no record was tried twice");
    let records = cluster.read_all(&cluster.dlq()).await;
    let kinds: HashSet<(String, String)> = records
        .iter()
        .map(|r| (text(r), r.header_str(h::ERROR_KIND).unwrap().to_owned()))
        .collect();
    assert!(kinds.contains(&(sent[0].clone(), "permanent".into())));
    assert!(kinds.contains(&(sent[1].clone(), "poison".into())));
    for r in &records {
        assert_eq!(r.header_str(h::ATTEMPTS), Some("1"));
    }
}

async fn failing_record_does_not_delay_later_records_and_retries_are_never_early(cluster: Env) {
    let mut cfg = cluster.config();
    cfg.retry =
        sidetrack::config::RetryConfig::tiers([sidetrack::Tier::new(Duration::from_secs(2), 1)]);
    let recorder = Recorder::new(|m| {
        if m.payload() == Some(b"first") && m.attempt() == 1 {
            return Err(HandlerError::retryable("not yet"));
        }
        Ok(())
    });
    let rt = cluster
        .builder(cfg)
        .handler(recorder.clone())
        .started()
        .await;
    let mut sent = vec!["first".to_string()];
    sent.extend(payloads("later", 10));
    cluster.produce_all(&sent, 0).await;
    wait_for("all handled", || rt.stats().handled == 11).await;
    rt.shutdown().await.unwrap();

    let all = recorder.all();
    let by = recorder.by_payload();
    let first = &by["first"];
    assert_eq!(first.len(), 2);
    let retry_at = first[1].at_ms;
    let due = first[1].due_ms.expect("retry carries a due time");
    assert!(retry_at >= due, "retry handled {}ms early", due - retry_at);
    assert!(retry_at - first[0].at_ms >= 2000, "tier delay respected");
    // Every later record was handled before the failing one came back.
    let later: Vec<_> = all
        .iter()
        .filter(|a| a.payload.starts_with("later"))
        .collect();
    assert_eq!(later.len(), 10);
    assert!(later.iter().all(|a| a.at_ms < retry_at));
    // ... and in partition order.
    let offsets: Vec<i64> = later.iter().map(|a| a.offset).collect();
    let mut sorted = offsets.clone();
    sorted.sort();
    assert_eq!(offsets, sorted);
}

async fn key_payload_and_user_headers_survive_to_dlq_byte_for_byte(cluster: Env) {
    // Fails once (retryable) so the record crosses a retry topic, then permanently.
    let recorder = Recorder::new(|m| {
        if m.attempt() == 1 {
            Err(HandlerError::retryable("first"))
        } else {
            Err(HandlerError::permanent("second"))
        }
    });
    let rt = cluster
        .builder(cluster.config())
        .handler(recorder.clone())
        .started()
        .await;
    let key: &[u8] = &[0xff, 0x00, 0xfe, b'k'];
    let payload: &[u8] = &[0x00, 0x9f, 0x92, 0x96, 0xff];
    let headers = vec![
        Header::new("trace-id", b"abc".to_vec()),
        Header {
            key: "nullable".into(),
            value: None,
        },
        Header::new("trace-id", vec![0xde, 0xad]),
        // Collides with an envelope name; must survive as the user's own header.
        Header::new(h::ATTEMPTS, b"user value".to_vec()),
        Header::new("empty", Vec::new()),
    ];
    let producer = cluster.producer();
    cluster
        .produce(
            &producer,
            cluster.topic(),
            Some(0),
            Some(key),
            Some(payload),
            &headers,
        )
        .await
        .unwrap();
    wait_for("dead-lettered", || rt.stats().total_dead_lettered() == 1).await;
    rt.shutdown().await.unwrap();

    let records = cluster.read_all(&cluster.dlq()).await;
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(r.key.as_deref(), Some(key));
    assert_eq!(r.payload.as_deref(), Some(payload));
    let (user, env) = r.envelope().unwrap();
    assert_eq!(user, &headers[..]);
    assert_eq!(env.attempts, 2);
    assert_eq!(sidetrack::outcome::error_kind_str(env.reason), "permanent");
    // The handler saw exactly the user's headers on both attempts.
    let seen = recorder.all();
    assert_eq!(seen.len(), 2);
}

async fn restart_resumes_from_committed_offsets(cluster: Env) {
    let first = Recorder::new(|_| Ok(()));
    let rt = cluster
        .builder(cluster.config())
        .handler(first.clone())
        .started()
        .await;
    let batch1 = payloads("one", 10);
    cluster.produce_all(&batch1, 2).await;
    wait_for("batch 1 handled", || rt.stats().handled == 10).await;
    rt.shutdown().await.unwrap();

    let batch2 = payloads("two", 10);
    cluster.produce_all(&batch2, 2).await;
    let second = Recorder::new(|_| Ok(()));
    let rt = cluster
        .builder(cluster.config())
        .handler(second.clone())
        .started()
        .await;
    wait_for("batch 2 handled", || rt.stats().handled == 10).await;
    rt.shutdown().await.unwrap();

    let seen2: HashSet<String> = second.all().into_iter().map(|a| a.payload).collect();
    assert_eq!(
        seen2,
        batch2.iter().cloned().collect::<HashSet<_>>(),
        "nothing replayed, nothing skipped"
    );
    assert_eq!(second.count(), 10);
    let seen1: HashSet<String> = first.all().into_iter().map(|a| a.payload).collect();
    assert_eq!(seen1, batch1.into_iter().collect::<HashSet<_>>());
}

async fn two_runtimes_in_one_group_split_partitions(cluster: Env) {
    let (a, b) = (Recorder::new(|_| Ok(())), Recorder::new(|_| Ok(())));
    let start = |r: Recorder| {
        cluster
            .builder(cluster.config())
            .handler(r)
            .build()
            .unwrap()
            .start()
    };
    let ra = start(a.clone()).await.unwrap();
    wait_for("first instance owns all 4", || {
        ra.assigned_partitions().len() == 4
    })
    .await;
    let rb = start(b.clone()).await.unwrap();
    wait_for("partitions split 2/2", || {
        ra.assigned_partitions().len() == 2 && rb.assigned_partitions().len() == 2
    })
    .await;
    let sent = payloads("split", 200);
    let offsets = cluster.produce_all(&sent, 4).await;
    wait_for("200 handled in total", || {
        ra.stats().handled + rb.stats().handled == 200
    })
    .await;
    // B's final commit lands while A's leaving rebalances the group: it is tried again
    // rather than lost, so every partition is committed to its end.
    let (sa, sb) = (ra.shutdown().await.unwrap(), rb.shutdown().await.unwrap());
    assert_eq!(sa.handled, 100);
    assert_eq!(sb.handled, 100);
    for p in 0..4 {
        let end = offsets
            .iter()
            .filter(|(q, _)| *q == p)
            .map(|(_, o)| o + 1)
            .max();
        let committed = cluster
            .committed_offset(cluster.group(), cluster.topic(), p)
            .await;
        assert_eq!(committed, end, "partition {p} committed to its end");
    }
    let union: HashSet<String> = a
        .all()
        .into_iter()
        .chain(b.all())
        .map(|x| x.payload)
        .collect();
    assert_eq!(union.len(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handoff_failure_keeps_offset_until_the_record_is_delivered() {
    // Fault injection needs the embedded broker.
    let cluster = Env::embedded(1);
    let Broker::Embedded(mock) = cluster.broker.clone() else {
        unreachable!()
    };
    let recorder = Recorder::new(|m| {
        if m.payload() == Some(b"bad") {
            Err(HandlerError::permanent("rejected"))
        } else {
            Ok(())
        }
    });
    let rt = cluster
        .builder(cluster.config())
        .handler(recorder.clone())
        .started()
        .await;
    // Warm up: the group is joined and a first offset committed.
    let sent = cluster.produce_all(&["warm".to_string()], 0).await;
    let warm_offset = sent[0].1;
    wait_for("warm-up handled", || rt.stats().handled == 1).await;

    let producer = cluster.producer();
    let (_, bad_offset) = cluster
        .produce(&producer, cluster.topic(), Some(0), None, Some(b"bad"), &[])
        .await
        .unwrap();
    // Every produce request fails from now on (the hand-off of "bad" included).
    mock.fail_requests(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 500],
    );
    wait_for("hand-off failing", || rt.stats().handoff_failures >= 2).await;
    // Give auto-commit (1 s) a chance to commit anything it wrongly had.
    let committed_ok = wait_until(Duration::from_millis(2500), || async {
        cluster
            .committed_offset(cluster.group(), cluster.topic(), 0)
            .await
            > Some(bad_offset)
    })
    .await;
    assert!(
        !committed_ok,
        "offset committed past a record that was not handed off"
    );
    assert_eq!(rt.stats().total_dead_lettered(), 0);
    assert!(
        cluster
            .committed_offset(cluster.group(), cluster.topic(), 0)
            .await
            >= Some(warm_offset + 1)
    );

    mock.clear_request_errors(RDKafkaApiKey::Produce);
    wait_for("dead-lettered after the fault cleared", || {
        rt.stats().total_dead_lettered() == 1
    })
    .await;
    let after = cluster
        .produce(
            &producer,
            cluster.topic(),
            Some(0),
            None,
            Some(b"after"),
            &[],
        )
        .await
        .unwrap();
    wait_for("record after the fault handled", || rt.stats().handled == 2).await;
    rt.shutdown().await.unwrap();
    assert_eq!(
        cluster
            .committed_offset(cluster.group(), cluster.topic(), 0)
            .await,
        Some(after.1 + 1)
    );
    let records = cluster.read_all(&cluster.dlq()).await;
    assert!(
        records.iter().any(|r| text(r) == "bad"),
        "the record reached the DLQ"
    );
    assert_eq!(
        recorder.by_payload()["bad"].len(),
        1,
        "handled once, handed off until it stuck"
    );
}

async fn corrupt_envelopes_on_a_retry_topic_are_dead_lettered_as_invalid(cluster: Env) {
    let recorder = Recorder::new(|_| Ok(()));
    let rt = cluster
        .builder(cluster.config())
        .handler(recorder.clone())
        .started()
        .await;
    let tier = &cluster.retry("200ms");
    let producer = cluster.producer();
    let valid = sidetrack::Envelope {
        key_order_since: None,
        after_dead_letter: None,
        original_topic: cluster.topic().into(),
        original_partition: 0,
        original_offset: 0,
        original_timestamp: None,
        group: cluster.group().into(),
        attempts: 1,
        first_failure: 0,
        // Due as it was written: a due time is checked against the retry record's own
        // timestamp (the writer's clock).
        due: Some(now_ms()),
        reason: None,
        error: "x".into(),
    };
    let with = |edit: &dyn Fn(&mut Vec<Header>)| {
        let mut hs = valid.to_headers();
        edit(&mut hs);
        hs
    };
    let set = |name: &'static str, value: &'static [u8]| {
        move |hs: &mut Vec<Header>| {
            for x in hs.iter_mut().filter(|x| x.is(name)) {
                x.value = Some(value.to_vec());
            }
        }
    };
    let cases: Vec<(&str, Vec<Header>)> = vec![
        ("no-envelope", vec![Header::new("user", b"x".to_vec())]),
        ("negative-attempt", with(&set(h::ATTEMPTS, b"-1"))),
        ("huge-attempt", with(&set(h::ATTEMPTS, b"4000000000"))),
        ("garbage-due", with(&set(h::DUE, b"soon"))),
        ("far-future-due", with(&set(h::DUE, b"99999999999999"))),
        // "Due long ago" used to pass, then `due - ahead` overflowed (a panic in debug builds,
        // a 292-million-year sleep with the partition paused in release builds).
        ("minimum-due", with(&set(h::DUE, b"-9223372036854775808"))),
        ("due-before-written", with(&set(h::DUE, b"1"))),
        ("foreign-topic", with(&set(h::ORIGINAL_TOPIC, b"payments"))),
        (
            "duplicated",
            with(&|hs: &mut Vec<Header>| hs.push(Header::new(h::ATTEMPTS, b"1".to_vec()))),
        ),
        ("valid", valid.to_headers()),
    ];
    for (name, headers) in &cases {
        cluster
            .produce(
                &producer,
                tier,
                Some(0),
                None,
                Some(name.as_bytes()),
                headers,
            )
            .await
            .unwrap();
    }
    wait_for("all retry records resolved", || {
        let s = rt.stats();
        s.handled == 1 && s.dead_lettered(Reason::InvalidEnvelope) == 9
    })
    .await;
    rt.shutdown().await.unwrap();
    let handled: Vec<String> = recorder.all().into_iter().map(|a| a.payload).collect();
    assert_eq!(handled, vec!["valid".to_string()]);
    let records = cluster.read_all(&cluster.dlq()).await;
    assert_eq!(records.len(), 9);
    for r in &records {
        assert_eq!(
            r.header_str(h::ERROR_KIND),
            Some("invalid-envelope"),
            "{}",
            text(r)
        );
        assert!(!r.header_str(h::ERROR).unwrap().is_empty());
    }
}

#[tokio::test]
async fn invalid_config_and_missing_topics_fail_clearly() {
    let cluster = Env::embedded(1);
    let mut cfg = cluster.config();
    cfg.retry.tiers = Some(vec![sidetrack::Tier::new(Duration::ZERO, 1)]);
    let err = cluster
        .builder(cfg)
        .handler(Recorder::new(|_| Ok(())))
        .build()
        .err()
        .expect("zero delay rejected");
    assert!(err.to_string().contains("retry.tiers[0].delay"), "{err}");

    let err = cluster
        .builder(cluster.config())
        .build()
        .err()
        .expect("no handler");
    assert!(matches!(err, Error::NoHandler));

    let mut cfg = cluster.config();
    cfg.provisioning.auto_create = false;
    let err = cluster
        .builder(cfg)
        .handler(Recorder::new(|_| Ok(())))
        .build()
        .unwrap()
        .start()
        .await
        .err()
        .expect("missing topics");
    let text = err.to_string();
    for t in [
        &cluster.retry("200ms"),
        &cluster.retry("500ms"),
        &cluster.dlq(),
    ] {
        assert!(text.contains(t), "{text}");
    }

    let mut cfg = cluster.config();
    cfg.topics = vec!["nope".into()];
    let err = cluster
        .builder(cfg)
        .handler(Recorder::new(|_| Ok(())))
        .build()
        .unwrap()
        .start()
        .await
        .err()
        .expect("missing source");
    assert!(
        matches!(&err, Error::SourceTopicMissing(t) if t == "nope"),
        "{err}"
    );
}

async fn many_retries_on_one_partition_are_each_handled_once_in_order(cluster: Env) {
    let mut cfg = cluster.config();
    cfg.retry = sidetrack::config::RetryConfig::tiers([sidetrack::Tier::new(
        Duration::from_millis(300),
        1,
    )]);
    // Every record fails its first attempt: the tier partition is paused and resumed for
    // many head records in a row.
    let recorder = Recorder::new(|m| {
        if m.attempt() == 1 {
            Err(HandlerError::retryable("first attempt fails"))
        } else {
            Ok(())
        }
    });
    let rt = cluster
        .builder(cfg)
        .handler(recorder.clone())
        .started()
        .await;
    let sent = payloads("r", 60);
    cluster.produce_all(&sent, 0).await;
    wait_for("60 handled on retry", || rt.stats().handled == 60).await;
    let stats = rt.shutdown().await.unwrap();
    assert_eq!(stats.retried, vec![60]);
    let by = recorder.by_payload();
    for p in &sent {
        let attempts: Vec<u32> = by[p].iter().map(|a| a.attempt).collect();
        assert_eq!(attempts, vec![1, 2], "{p}");
        let retry = &by[p][1];
        assert!(retry.at_ms >= retry.due_ms.unwrap(), "{p} handled early");
    }
    let retried_order: Vec<i64> = recorder
        .all()
        .into_iter()
        .filter(|a| a.attempt == 2)
        .map(|a| a.offset)
        .collect();
    let mut sorted = retried_order.clone();
    sorted.sort();
    assert_eq!(retried_order, sorted, "a tier is first-in-first-due");
}

async fn shutdown_finishes_in_flight_work_or_abandons_it_uncommitted(cluster: Env) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let started = Arc::new(AtomicBool::new(false));
    let flag = started.clone();
    // "slow" takes 1 s (well within the 5 s shutdown timeout); "stuck" never finishes.
    let slow = sidetrack::handler_fn(move |m: sidetrack::Message, _cx| {
        let flag = flag.clone();
        async move {
            flag.store(true, Ordering::SeqCst);
            match m.payload() {
                Some(b"slow") => tokio::time::sleep(Duration::from_secs(1)).await,
                Some(b"stuck") => std::future::pending::<()>().await,
                _ => {}
            }
            Ok(())
        }
    });
    let mut cfg = cluster.config();
    cfg.shutdown_timeout = Duration::from_millis(1500);
    let rt = cluster.builder(cfg.clone()).handler(slow).started().await;
    let sent = cluster.produce_all(&["slow".to_string()], 0).await;
    wait_for("slow record started", || started.load(Ordering::SeqCst)).await;
    let stats = rt.shutdown().await.unwrap();
    assert_eq!(
        stats.handled, 1,
        "in-flight record finished during shutdown"
    );
    assert_eq!(
        cluster
            .committed_offset(cluster.group(), cluster.topic(), 0)
            .await,
        Some(sent[0].1 + 1)
    );

    started.store(false, Ordering::SeqCst);
    let flag = started.clone();
    let stuck = sidetrack::handler_fn(move |m: sidetrack::Message, _cx| {
        let flag = flag.clone();
        async move {
            flag.store(true, Ordering::SeqCst);
            if m.payload() == Some(b"stuck") {
                std::future::pending::<()>().await;
            }
            Ok(())
        }
    });
    let rt = cluster.builder(cfg.clone()).handler(stuck).started().await;
    let stuck_at = cluster.produce_all(&["stuck".to_string()], 0).await[0].1;
    wait_for("stuck record started", || started.load(Ordering::SeqCst)).await;
    let begun = std::time::Instant::now();
    let stats = rt.shutdown().await.unwrap();
    assert!(
        begun.elapsed() < Duration::from_secs(10),
        "shutdown is bounded"
    );
    assert_eq!(stats.handled, 0);
    assert_eq!(
        cluster
            .committed_offset(cluster.group(), cluster.topic(), 0)
            .await,
        Some(stuck_at),
        "abandoned record is not committed"
    );

    // After a restart the abandoned record is delivered again.
    let recorder = Recorder::new(|_| Ok(()));
    let rt = cluster
        .builder(cfg)
        .handler(recorder.clone())
        .started()
        .await;
    wait_for("abandoned record redelivered", || rt.stats().handled == 1).await;
    rt.shutdown().await.unwrap();
    let seen: Vec<String> = recorder.all().into_iter().map(|a| a.payload).collect();
    assert_eq!(seen, vec!["stuck".to_string()]);
}

on_every_broker!(success_commits_offsets, 2, success_commits_offsets);
on_every_broker!(
    transient_failure_is_retried_via_tier_topic_then_succeeds,
    1,
    transient_failure_is_retried_via_tier_topic_then_succeeds
);
on_every_broker!(
    exhausted_retries_go_to_dlq_with_full_envelope,
    1,
    exhausted_retries_go_to_dlq_with_full_envelope
);
on_every_broker!(
    permanent_and_undecodable_go_to_dlq_at_once,
    1,
    permanent_and_undecodable_go_to_dlq_at_once
);
on_every_broker!(
    failing_record_does_not_delay_later_records_and_retries_are_never_early,
    1,
    failing_record_does_not_delay_later_records_and_retries_are_never_early
);
on_every_broker!(
    key_payload_and_user_headers_survive_to_dlq_byte_for_byte,
    1,
    key_payload_and_user_headers_survive_to_dlq_byte_for_byte
);
on_every_broker!(
    restart_resumes_from_committed_offsets,
    2,
    restart_resumes_from_committed_offsets
);
on_every_broker!(
    two_runtimes_in_one_group_split_partitions,
    4,
    two_runtimes_in_one_group_split_partitions
);
on_every_broker!(
    corrupt_envelopes_on_a_retry_topic_are_dead_lettered_as_invalid,
    1,
    corrupt_envelopes_on_a_retry_topic_are_dead_lettered_as_invalid
);
on_every_broker!(
    many_retries_on_one_partition_are_each_handled_once_in_order,
    1,
    many_retries_on_one_partition_are_each_handled_once_in_order
);
on_every_broker!(
    shutdown_finishes_in_flight_work_or_abandons_it_uncommitted,
    1,
    shutdown_finishes_in_flight_work_or_abandons_it_uncommitted
);

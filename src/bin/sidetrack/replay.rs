//! `dlq replay`: put selected dead letters back, at most once per progress group.
//!
//! Records are sent in batches of [`BATCH`] with an idempotent producer; the progress (the next
//! DLQ offset to consider, per partition) is committed under the progress group only after
//! every record of a batch was acknowledged. An interrupted replay therefore resumes after the
//! last committed batch: at most one batch is sent twice.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord};
use sidetrack::dead_letter::{Provenance, Record, StartAt};
use sidetrack::retry::{format_delay, ErrorKind};
use sidetrack::{Config, Envelope, Header};

use crate::dlq::{now_ms, select, Row};
use crate::kafka::Kafka;
use crate::{Failure, ReplayArgs};

/// Records acknowledged before progress is saved.
const BATCH: usize = 100;

/// Provenance headers written on every replayed record (earlier ones are replaced).
const REPLAY_ID: &str = "sidetrack-replay-id";
const REPLAYED_AT: &str = "sidetrack-replayed-at";
const REPLAYED_FROM: &str = "sidetrack-replayed-from";

struct Planned {
    record: Record,
    row: Row,
    topic: String,
    partition: Option<i32>,
    headers: Vec<Header>,
}

pub async fn replay(kafka: &Kafka, args: &ReplayArgs) -> Result<(), Failure> {
    let dlq = &args.filters.topic;
    let dlq_parts = kafka.partitions(dlq).await?;
    let group = args
        .progress_group
        .clone()
        .unwrap_or_else(|| default_group(args));
    let start = if args.restart {
        dlq_parts.iter().map(|p| (*p, 0)).collect()
    } else {
        let committed = kafka.committed(&group, dlq).await?;
        dlq_parts
            .iter()
            .map(|p| (*p, committed.get(p).copied().unwrap_or(0)))
            .collect::<HashMap<i32, i64>>()
    };
    // Remember how far each partition was scanned: progress may pass filtered-out records.
    let selected = select(
        kafka,
        &args.filters,
        StartAt::Offsets(start.clone()),
        args.limit,
    )
    .await?;
    let ends = kafka.watermarks(dlq).await?;
    let scanned_to: HashMap<i32, i64> = if args.limit.is_some_and(|l| selected.len() >= l) {
        // Stopped early: only up to the last selected record of each partition.
        let mut m = start.clone();
        for (r, _) in &selected {
            m.insert(r.partition, r.offset + 1);
        }
        m
    } else {
        ends.iter().map(|(p, (_, high))| (*p, *high)).collect()
    };

    let replay_id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    let replayed_at = now_ms();
    let config = match &args.config {
        Some(path) => Some(Config::from_file(path).map_err(|e| Failure::Usage(e.to_string()))?),
        None => None,
    };
    let mut plan = Vec::new();
    let mut skipped = Vec::new();
    let mut partitions_cache: HashMap<String, i32> = HashMap::new();
    let all_topics = if args.to == "first-retry" && config.is_none() {
        kafka.topic_names().await?
    } else {
        Vec::new()
    };
    for (record, row) in selected {
        let target = match target_of(&args.to, &record, config.as_ref(), &all_topics) {
            Ok(t) => t,
            Err(why) => {
                skipped.push(format!("{}:{} {why}", record.partition, record.offset));
                continue;
            }
        };
        let (topic, envelope) = target;
        if !partitions_cache.contains_key(&topic) {
            let n = kafka.partitions(&topic).await?.len() as i32;
            partitions_cache.insert(topic.clone(), n);
        }
        // The original partition number when the target has it (retry topics do: they are
        // created with the source's partition count), else the key decides.
        let partition = row
            .original_partition
            .filter(|p| *p < partitions_cache[&topic]);
        let mut headers: Vec<Header> = record
            .user_headers()
            .iter()
            .filter(|h| {
                ![REPLAY_ID, REPLAYED_AT, REPLAYED_FROM]
                    .iter()
                    .any(|n| h.is(n))
            })
            .cloned()
            .collect();
        headers.push(Header::new(REPLAY_ID, replay_id.clone()));
        headers.push(Header::new(REPLAYED_AT, replayed_at.to_string()));
        headers.push(Header::new(
            REPLAYED_FROM,
            format!("{}:{}:{}", dlq, record.partition, record.offset),
        ));
        if let Some(e) = envelope {
            headers.extend(e.to_headers());
        }
        plan.push(Planned {
            record,
            row,
            topic,
            partition,
            headers,
        });
    }

    let send = args.yes && !args.dry_run;
    if !send {
        for p in &plan {
            println!(
                "would send {}:{} -> {}{} key={} ({})",
                p.record.partition,
                p.record.offset,
                p.topic,
                p.partition.map(|x| format!("[{x}]")).unwrap_or_default(),
                p.row.key.as_deref().unwrap_or("-"),
                p.row.reason.as_deref().unwrap_or("no envelope"),
            );
        }
        for s in &skipped {
            println!("would skip {s}");
        }
        println!(
            "dry run: {} record{} would be replayed from `{dlq}`{}; nothing was sent{}",
            plan.len(),
            if plan.len() == 1 { "" } else { "s" },
            if skipped.is_empty() {
                String::new()
            } else {
                format!(", {} skipped", skipped.len())
            },
            if args.yes { "" } else { " (add --yes to send)" }
        );
        return Ok(());
    }

    let mut pconfig = kafka.clone_config();
    pconfig
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set(
            "message.timeout.ms",
            kafka.timeout.as_millis().max(1000).to_string(),
        );
    let producer: FutureProducer = pconfig
        .create()
        .map_err(|e| Failure::Other(format!("creating the producer: {e}")))?;
    let total = plan.len();
    let bar = Progress::new(total);
    let started = Instant::now();
    let mut sent = 0usize;
    for (i, batch) in plan.chunks(BATCH).enumerate() {
        let mut pending = Vec::with_capacity(batch.len());
        for p in batch {
            if let Some(rate) = args.rate {
                let due = started + Duration::from_secs_f64(sent as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
            }
            let hs = sidetrack::handler::rdkafka_headers(&p.headers);
            let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&p.topic).headers(hs);
            if let Some(k) = p.record.key.as_deref() {
                rec = rec.key(k);
            }
            if let Some(v) = p.record.payload.as_deref() {
                rec = rec.payload(v);
            }
            if let Some(part) = p.partition {
                rec = rec.partition(part);
            }
            let fut = producer.send_result(rec).map_err(|(e, _)| {
                Failure::Other(format!(
                    "sending {}:{}: {e}",
                    p.record.partition, p.record.offset
                ))
            })?;
            pending.push((p, fut));
            sent += 1;
        }
        for (p, fut) in pending {
            match fut.await {
                Ok(Ok(_)) => bar.tick(),
                Ok(Err((e, _))) => {
                    return Err(Failure::Other(format!(
                        "{}:{} was not acknowledged by `{}`: {e}; progress kept up to the previous batch, run again to resume",
                        p.record.partition, p.record.offset, p.topic
                    )))
                }
                Err(_) => return Err(Failure::Other("producer closed".into())),
            }
        }
        // Everything before the next unsent record of a partition is done (sent or filtered).
        let rest = &plan[((i + 1) * BATCH).min(total)..];
        let mut progress = scanned_to.clone();
        for p in rest.iter().rev() {
            progress.insert(p.record.partition, p.record.offset);
        }
        kafka.commit(&group, dlq, &progress).await?;
    }
    if total == 0 {
        kafka.commit(&group, dlq, &scanned_to).await?;
    }
    bar.finish();
    if total == 0 {
        println!(
            "replayed 0 records: nothing new in `{dlq}` matches{}; progress is kept under consumer group `{group}` (--restart to consider everything again)",
            if skipped.is_empty() { String::new() } else { format!(" ({} skipped)", skipped.len()) },
        );
        return Ok(());
    }
    let targets: std::collections::BTreeSet<&str> = plan.iter().map(|p| p.topic.as_str()).collect();
    println!(
        "replayed {total} record{} from `{dlq}` to {} (all acknowledged){}; progress saved under consumer group `{group}`",
        if total == 1 { "" } else { "s" },
        targets.into_iter().collect::<Vec<_>>().join(", "),
        if skipped.is_empty() { String::new() } else { format!(", {} skipped", skipped.len()) },
    );
    for s in &skipped {
        eprintln!("skipped {s}");
    }
    Ok(())
}

/// The topic a record goes to and, for a retry tier, its fresh envelope.
fn target_of(
    to: &str,
    r: &Record,
    config: Option<&Config>,
    all_topics: &[String],
) -> Result<(String, Option<Envelope>), String> {
    match to {
        "original" => match r.provenance() {
            Provenance::Sidetrack(e) => Ok((e.original_topic, None)),
            Provenance::Spring(s) => s
                .original_topic
                .map(|t| (t, None))
                .ok_or_else(|| "has no kafka_dlt-original-topic".to_owned()),
            Provenance::Unknown(_) => {
                Err("has no envelope naming its original topic; use --to TOPIC".to_owned())
            }
        },
        "first-retry" => {
            let Provenance::Sidetrack(e) = r.provenance() else {
                return Err("has no sidetrack envelope; a retry tier needs one (use --to original or --to TOPIC)".into());
            };
            let tier = first_tier(&e, config, all_topics)?;
            let now = now_ms();
            let fresh = Envelope {
                attempts: 1,
                first_failure: now,
                due: Some(now),
                error_kind: ErrorKind::Retryable,
                error: format!("replayed from the dead-letter topic (was: {})", e.error),
                ..e
            };
            Ok((tier, Some(fresh)))
        }
        topic => Ok((topic.to_owned(), None)),
    }
}

fn first_tier(
    e: &Envelope,
    config: Option<&Config>,
    all_topics: &[String],
) -> Result<String, String> {
    if let Some(c) = config {
        let mut c = c.clone();
        c.topics = vec![e.original_topic.clone()];
        c.group = e.group.clone();
        let policy = c.retry.policy().map_err(|x| x.to_string())?;
        let topology = sidetrack::retry::Topology::new(&c, &policy).map_err(|x| x.to_string())?;
        return topology.sources()[0]
            .retry
            .first()
            .map(|t| t.name.clone())
            .ok_or_else(|| "the config has no retry tiers".to_owned());
    }
    let prefix = format!("{}.{}.retry.", e.original_topic, e.group);
    all_topics
        .iter()
        .filter_map(|t| {
            let d = humantime::parse_duration(t.strip_prefix(&prefix)?).ok()?;
            (format_delay(d) == t[prefix.len()..]).then_some((d, t))
        })
        .min()
        .map(|(_, t)| t.clone())
        .ok_or_else(|| format!("no retry topic `{prefix}*` exists; pass --config"))
}

/// Same topic, filters and target → same group, so a repeated replay sends nothing new.
fn default_group(a: &ReplayArgs) -> String {
    let f = &a.filters;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (
        &f.topic,
        f.since,
        f.until,
        &f.error_contains,
        f.reason.map(|r| format!("{r:?}")),
        &f.key,
        &a.to,
    )
        .hash(&mut h);
    format!("sidetrack-replay.{}.{:08x}", f.topic, h.finish() as u32)
}

/// A progress bar on stderr when it is a terminal.
struct Progress {
    total: usize,
    done: std::cell::Cell<usize>,
    on: bool,
}

impl Progress {
    fn new(total: usize) -> Self {
        Progress {
            total,
            done: std::cell::Cell::new(0),
            on: std::io::stderr().is_terminal() && total > 0,
        }
    }
    fn tick(&self) {
        self.done.set(self.done.get() + 1);
        if self.on {
            let width = 30;
            let filled = self.done.get() * width / self.total.max(1);
            eprint!(
                "\rreplaying [{}{}] {}/{}",
                "#".repeat(filled),
                ".".repeat(width - filled),
                self.done.get(),
                self.total
            );
            let _ = std::io::stderr().flush();
        }
    }
    fn finish(&self) {
        if self.on {
            eprintln!();
        }
    }
}

//! `dlq replay`: put selected dead letters back, at most once per progress group.
//!
//! The DLQ is scanned from the progress saved under the progress group up to its end offsets
//! as seen when the scan begins; selected records stream through a bounded channel and are
//! sent in batches of at most [`BATCH`] with an idempotent producer. The progress (the next DLQ
//! offset to consider, per partition) is committed under the progress group only after every
//! record of a batch was acknowledged, and never past what the scan read. An interrupted
//! replay therefore resumes after the last committed batch: at most one batch is sent twice.
//!
//! A real run (not a dry run) first joins the progress group as a member and sends only while
//! it owns every partition of the DLQ: a second replay of the same selection is refused, and a
//! replay that loses a partition stops before its next batch (see [`Member`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{IsTerminal, Write};
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord};
use sidetrack::admin::{fnv1a64, is_legal_topic as legal_topic, now_ms};
use sidetrack::config::RetryConfig;
use sidetrack::dead_letter::{Provenance, Record, StartAt};
use sidetrack::escape::for_terminal;
use sidetrack::retry::{next_hop, tier_delay_of, RetryPolicy, Topology};
use sidetrack::{Config, Disposition, Envelope, Header, Message, Reason, Tier};
use tokio::sync::mpsc;

use crate::dlq::{Row, Verdict};
use crate::kafka::{held_back, Kafka, Member};
use crate::{Failure, ReplayArgs};

/// Records acknowledged before progress is saved.
const BATCH: usize = 100;
/// Records between the scan and the sender (the scan waits when it is full).
const CHANNEL: usize = 256;
/// With `--rate`, a batch holds about this much sending time, so a replay that lost its
/// progress group stops soon (ownership is checked between batches).
const BATCH_TIME: Duration = Duration::from_secs(5);
/// Target topics whose partition count is remembered (envelopes can name any number).
const TOPIC_CACHE: usize = 1024;
/// Largest record the replay producer sends unless `-X message.max.bytes` says otherwise:
/// an `oversized` original is bigger than librdkafka's 1 MB default by nature. The broker
/// still enforces the topic's own limit.
const MAX_MESSAGE_BYTES: &str = "100000000";

/// Characters shown of a topic name (Kafka's limit is 249).
const NAME: usize = 256;
/// Characters shown of a key in a dry run.
const KEY: usize = 256;
/// Characters shown of why a record is skipped.
const TEXT: usize = 2048;

/// Provenance headers written on every replayed record (earlier ones are replaced). This
/// one: one random id per run (128 bits, hex), the same on every record that run sent, so the
/// records of one replay can be found again (or told apart from a second run's).
const REPLAY_ID: &str = "sidetrack-replay-id";
/// Provenance header: when the run started, in milliseconds since the Unix epoch (decimal).
const REPLAYED_AT: &str = "sidetrack-replayed-at";
/// Provenance header: `dlq-topic:partition:offset` of the dead letter the record was copied
/// from, so a record that fails again and comes back to the DLQ points at its earlier copy.
const REPLAYED_FROM: &str = "sidetrack-replayed-from";

/// What the scan hands the sender.
enum Item {
    /// A record the filters select.
    Selected(Box<Record>, Box<Row>),
    /// The first record of a partition that only a relative `--until` excludes: a later run
    /// may select it, so progress stops there (and nothing after it is sent in this run).
    Hold { partition: i32, offset: i64 },
}

/// One record ready to send.
struct Planned {
    /// Where the record came from in the DLQ: progress and messages name it by this position.
    dlq_partition: i32,
    dlq_offset: i64,
    /// The topic it is sent to: the original, a retry tier or `--to TOPIC`.
    topic: String,
    /// The original partition when the target has that many, else `None` (the key decides).
    partition: Option<i32>,
    /// The key to send: the dead letter's own, or the original's for an `oversized` one.
    key: Option<Vec<u8>>,
    /// The value to send, read back from the original topic for an `oversized` dead letter.
    payload: Option<Vec<u8>>,
    /// User headers, then the replay's provenance headers, then a fresh envelope for a retry tier.
    headers: Vec<Header>,
}

/// Runs `dlq replay` to its end: checks the filters, resolves the progress group (given or
/// [`default_group`]), joins it as a member when sending for real, scans and sends, then leaves
/// the group whatever happened.
///
/// # Errors
///
/// [`Failure::Usage`] for bad filters or an unreadable `--config`, [`Failure::UnknownTopic`]
/// when the DLQ or a fixed `--to` topic does not exist, and any broker failure of the scan, the
/// membership or the producer ([`Failure::Other`] and friends). A failed run keeps the progress
/// of its last acknowledged batch, so running the same command again resumes.
pub(crate) async fn replay(kafka: &Kafka, args: &ReplayArgs) -> Result<(), Failure> {
    let dlq = args.filters.topic.clone();
    let now = now_ms();
    args.filters.check(now)?;
    let dlq_parts = kafka.partitions(&dlq).await?;
    let group = args
        .progress_group
        .clone()
        .unwrap_or_else(|| default_group(args));
    let send = args.yes && !args.dry_run;
    let config = match &args.config {
        Some(path) => Some(Config::from_file(path).map_err(|e| Failure::Usage(e.to_string()))?),
        None => None,
    };
    if !matches!(args.to.as_str(), "original" | "first-retry") {
        // One target for every record: it must exist.
        kafka.partitions(&args.to).await?;
    }
    let all_topics = if args.to == "first-retry" && config.is_none() {
        kafka.topic_names().await?
    } else {
        Vec::new()
    };

    // The membership is the lock: taken before progress is read, so no other replay of this
    // selection sends from the same progress.
    let member = if send {
        Some(Member::join(kafka, &group, &dlq, &dlq_parts).await?)
    } else {
        None
    };
    let outcome = run(
        kafka,
        args,
        Plan {
            dlq: dlq.clone(),
            group: group.clone(),
            now,
            config,
            all_topics,
            replay_id: format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)),
            partitions: HashMap::new(),
        },
        &dlq_parts,
        member.as_ref(),
    )
    .await;
    if let Some(m) = member {
        m.leave().await;
    }
    outcome
}

/// Everything a selected record needs to become a [`Planned`] one.
struct Plan {
    /// The DLQ being replayed (its name as given).
    dlq: String,
    /// The progress group: where progress is committed, and the lock while sending.
    group: String,
    /// When the run started (ms since the epoch): relative filters and `sidetrack-replayed-at`.
    now: i64,
    /// `--config`: the retry tiers of `--to first-retry`, instead of the topics found on the
    /// broker.
    config: Option<Config>,
    /// Every topic on the broker, listed once for `--to first-retry` without `--config`.
    all_topics: Vec<String>,
    /// This run's [`REPLAY_ID`].
    replay_id: String,
    /// Partition count of each target topic seen (`None`: it does not exist).
    partitions: HashMap<String, Option<i32>>,
}

/// The body of a replay once the membership (the lock) is held: reads the saved progress
/// (or starts at 0 with `--restart`), scans the DLQ on a blocking thread while the sender plans
/// and sends what the scan selects, and commits progress no further than both what the scan
/// read and the first held-back record of each partition.
///
/// The scan and the sender are joined, not raced: the sender's error is reported first,
/// because a closed channel is how the sender stops the scan.
async fn run(
    kafka: &Kafka,
    args: &ReplayArgs,
    mut plan: Plan,
    dlq_parts: &[i32],
    member: Option<&Member>,
) -> Result<(), Failure> {
    let dlq = plan.dlq.clone();
    let committed = match member {
        Some(m) => m.committed(dlq_parts).await?,
        None if args.restart => HashMap::new(),
        None => kafka.committed(&plan.group, &dlq).await?,
    };
    let start: HashMap<i32, i64> = dlq_parts
        .iter()
        .map(|p| {
            (
                *p,
                if args.restart {
                    0
                } else {
                    committed.get(p).copied().unwrap_or(0)
                },
            )
        })
        .collect();

    let (tx, mut rx) = mpsc::channel::<Item>(CHANNEL);
    let scan = kafka.scan(&dlq, StartAt::Offsets(start.clone()), {
        let (filters, limit, now) = (args.filters.clone(), args.limit, plan.now);
        let mut selected = 0usize;
        let mut held = BTreeSet::new();
        move |r: Record| {
            if held.contains(&r.partition) {
                return ControlFlow::Continue(());
            }
            let row = Row::at(&r, now);
            let item = match filters.verdict(&r, &row, now) {
                Verdict::No => return ControlFlow::Continue(()),
                Verdict::NotYet => {
                    held.insert(r.partition);
                    Item::Hold {
                        partition: r.partition,
                        offset: r.offset,
                    }
                }
                Verdict::Yes => {
                    selected += 1;
                    Item::Selected(Box::new(r), Box::new(row))
                }
            };
            // A closed channel: the sender failed and stops the scan.
            if tx.blocking_send(item).is_err() || limit.is_some_and(|l| selected >= l) {
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        }
    });

    let group = plan.group.clone();
    let mut out = Sender::new(kafka, args, &group, start, committed, member)?;
    let work = async {
        while let Some(item) = rx.recv().await {
            match item {
                Item::Hold { partition, offset } => {
                    out.holds.entry(partition).or_insert(offset);
                }
                Item::Selected(record, row) => {
                    let (p, o) = (record.partition, record.offset);
                    let planned = plan_one(kafka, args, &mut plan, &record, &row).await?;
                    // Done once the batch it joins is acknowledged (or at once, skipped).
                    out.seen.insert(p, o.saturating_add(1));
                    match planned {
                        Ok(planned) => out.add(planned, &row).await?,
                        Err(why) => out.skip(p, o, &why),
                    }
                }
            }
        }
        Ok::<(), Failure>(())
    };
    let (scanned, worked) = tokio::join!(scan, work);
    // The sender's failure first: it is why the scan stopped.
    worked?;
    let scanned = scanned?;
    let then = if member.is_some() {
        "progress stops there: run the same command again once it commits to replay its records"
    } else {
        "its records are not considered until it commits"
    };
    for line in held_back(&dlq, &scanned, then) {
        eprintln!("{line}");
    }
    // What the scan read, and no further than a record a later run may still select.
    let mut end: HashMap<i32, i64> = scanned.reached;
    for (p, h) in &out.holds {
        end.entry(*p).and_modify(|e| *e = (*e).min(*h));
    }
    out.finish(&dlq, end).await
}

/// Sends batches, commits progress through the member, reports.
struct Sender<'a> {
    /// The command line: filters, `--rate`, `--yes`, `--dry-run`.
    args: &'a ReplayArgs,
    /// The progress group's name, for messages.
    group: &'a str,
    /// The membership when sending for real; `None` in a dry run (nothing is sent or committed).
    member: Option<&'a Member>,
    /// Idempotent, `acks=all` producer; created only when there is a member.
    producer: Option<FutureProducer>,
    /// Records planned and not yet sent: at most `batch_size`.
    batch: Vec<Planned>,
    /// [`BATCH`], or fewer with `--rate` so a batch takes about [`BATCH_TIME`].
    batch_size: usize,
    /// Next offset to consider per partition, as far as records were planned or skipped.
    seen: HashMap<i32, i64>,
    /// Per partition, the first record only a relative `--until` excludes.
    holds: HashMap<i32, i64>,
    /// Last progress committed, or the start.
    saved: HashMap<i32, i64>,
    /// The progress group's committed offsets as this run left them.
    group_committed: HashMap<i32, i64>,
    /// Records selected (sent or, in a dry run, listed).
    planned: usize,
    /// Records acknowledged by the broker in this run.
    sent: usize,
    /// Records selected but not sendable (target missing, original gone), each reported once.
    skipped: usize,
    /// Every topic sent to, for the closing summary.
    targets: BTreeSet<String>,
    /// With `--rate`: when the next record may go.
    next_send: Instant,
    /// The terminal's running count.
    bar: Progress,
}

impl<'a> Sender<'a> {
    /// Creates the sender; for a real run, the producer too: idempotent and `acks=all` (so a
    /// retried send is not duplicated within the run), `message.max.bytes` raised to
    /// [`MAX_MESSAGE_BYTES`] unless `-X` set it, and a delivery timeout no shorter than 1 s.
    fn new(
        kafka: &Kafka,
        args: &'a ReplayArgs,
        group: &'a str,
        start: HashMap<i32, i64>,
        group_committed: HashMap<i32, i64>,
        member: Option<&'a Member>,
    ) -> Result<Self, Failure> {
        let producer = match member {
            None => None,
            Some(_) => {
                let mut pconfig = kafka.clone_config();
                if pconfig.get("message.max.bytes").is_none() {
                    pconfig.set("message.max.bytes", MAX_MESSAGE_BYTES);
                }
                pconfig
                    .set("enable.idempotence", "true")
                    .set("acks", "all")
                    .set(
                        "message.timeout.ms",
                        kafka.timeout.as_millis().max(1000).to_string(),
                    );
                Some(
                    pconfig
                        .create()
                        .map_err(|e| Failure::Other(format!("creating the producer: {e}")))?,
                )
            }
        };
        // Truncation is the point: a batch of at most BATCH_TIME's worth, at least one.
        let batch_size = match args.rate {
            Some(r) => ((r * BATCH_TIME.as_secs_f64()) as usize).clamp(1, BATCH),
            None => BATCH,
        };
        Ok(Sender {
            args,
            group,
            member,
            producer,
            batch: Vec::with_capacity(batch_size),
            batch_size,
            seen: start.clone(),
            holds: HashMap::new(),
            saved: start,
            group_committed,
            planned: 0,
            sent: 0,
            skipped: 0,
            targets: BTreeSet::new(),
            next_send: Instant::now(),
            bar: Progress::new(),
        })
    }

    /// Takes one planned record: in a dry run prints what would be sent (one escaped line per
    /// record), otherwise adds it to the batch and flushes a full batch with the progress seen so
    /// far.
    async fn add(&mut self, p: Planned, row: &Row) -> Result<(), Failure> {
        self.planned += 1;
        self.targets.insert(p.topic.clone());
        if self.member.is_none() {
            // One line per record whatever its bytes: on-call reads these before `--yes`.
            println!(
                "would send {}:{} -> {}{} key={} ({})",
                p.dlq_partition,
                p.dlq_offset,
                for_terminal(&p.topic, NAME),
                p.partition.map(|x| format!("[{x}]")).unwrap_or_default(),
                row.raw_key
                    .as_deref()
                    .map(|k| for_terminal(k, KEY))
                    .unwrap_or_else(|| "-".into()),
                row.reason.as_deref().unwrap_or("no envelope"),
            );
            return Ok(());
        }
        self.batch.push(p);
        if self.batch.len() >= self.batch_size {
            let progress = self.progress(&self.seen);
            self.flush(progress).await?;
        }
        Ok(())
    }

    /// Counts a selected record that cannot be sent and says why (escaped: `why` may quote
    /// envelope fields). Its offset still counts as done: a later run would skip it again.
    fn skip(&mut self, partition: i32, offset: i64, why: &str) {
        self.skipped += 1;
        // `why` may quote envelope fields (topic names): escaped here, once.
        let why = for_terminal(why, TEXT);
        if self.member.is_none() {
            println!("would skip {partition}:{offset} {why}");
        } else {
            eprintln!("skipped {partition}:{offset} {why}");
        }
    }

    /// `upto` capped by the holds.
    fn progress(&self, upto: &HashMap<i32, i64>) -> HashMap<i32, i64> {
        upto.iter()
            .map(|(p, o)| (*p, self.holds.get(p).map_or(*o, |h| (*o).min(*h))))
            .collect()
    }

    /// Sends the batch, waits for every acknowledgement, then commits `progress`.
    async fn flush(&mut self, progress: HashMap<i32, i64>) -> Result<(), Failure> {
        let (Some(member), Some(producer)) = (self.member, self.producer.as_ref()) else {
            return Ok(());
        };
        // The first record's wait comes before the ownership check, so a revocation during
        // the wait stops this batch.
        if let Some(rate) = self.args.rate {
            pace(&mut self.next_send, rate).await;
        }
        if let Err(why) = member.check() {
            // Sending stops here. The newcomer owns only some partitions: it refuses and leaves,
            // and this replay goes on once it owns all of them again.
            eprintln!("{why}; paused until it leaves");
            if let Err(why) = member.regain(&self.group_committed).await {
                return Err(Failure::Other(format!(
                    "{why}; stopping; {} record{} sent by this run, progress saved up to {}; run the same command again to resume",
                    self.sent,
                    if self.sent == 1 { "" } else { "s" },
                    positions(&self.saved)
                )));
            }
            eprintln!("every partition of the DLQ is this replay's again; going on");
        }
        // Belt and braces for brokers that hand a partition to a newcomer without making its
        // owner rejoin first (seen on Tansu 0.6 with a 2-partition DLQ: the newcomer got one
        // partition, the owner was never told and kept both): the group's progress must still
        // be what this run left there. At worst each side sends one batch before it notices.
        let parts: Vec<i32> = self.saved.keys().copied().collect();
        let theirs = member.committed(&parts).await?;
        if theirs != self.group_committed {
            return Err(Failure::Other(format!(
                "another replay saved progress under consumer group `{}` meanwhile (up to {}); stopping; {} record{} sent by this run",
                self.group,
                positions(&theirs),
                self.sent,
                if self.sent == 1 { "" } else { "s" },
            )));
        }
        let mut pending = Vec::with_capacity(self.batch.len());
        for (i, p) in self.batch.iter().enumerate() {
            if let (Some(rate), true) = (self.args.rate, i > 0) {
                pace(&mut self.next_send, rate).await;
            }
            let hs = sidetrack::handler::rdkafka_headers(&p.headers);
            let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&p.topic).headers(hs);
            if let Some(k) = p.key.as_deref() {
                rec = rec.key(k);
            }
            if let Some(v) = p.payload.as_deref() {
                rec = rec.payload(v);
            }
            if let Some(part) = p.partition {
                rec = rec.partition(part);
            }
            let fut = producer.send_result(rec).map_err(|(e, _)| {
                Failure::Other(format!(
                    "sending {}:{}: {e}; progress kept up to {}, run again to resume",
                    p.dlq_partition,
                    p.dlq_offset,
                    positions(&self.saved)
                ))
            })?;
            pending.push((p, fut));
        }
        for (p, fut) in pending {
            match fut.await {
                Ok(Ok(_)) => self.bar.tick(),
                Ok(Err((e, _))) => {
                    return Err(Failure::Other(format!(
                        "{}:{} was not acknowledged by `{}`: {e}; progress kept up to {}, run again to resume",
                        p.dlq_partition,
                        p.dlq_offset,
                        p.topic,
                        positions(&self.saved)
                    )))
                }
                Err(_) => return Err(Failure::Other("producer closed".into())),
            }
        }
        self.sent += self.batch.len();
        self.batch.clear();
        if progress != self.group_committed {
            member.commit(&progress).await?;
            self.group_committed = progress.clone();
        }
        self.saved = progress;
        Ok(())
    }

    /// Ends the run: flushes the last batch with the progress up to `end` (what the scan read,
    /// capped by holds), then prints the summary: what was sent where, or why nothing was.
    async fn finish(mut self, dlq: &str, end: HashMap<i32, i64>) -> Result<(), Failure> {
        // Names as given on the command line (an alert's command, pasted): shown escaped too.
        let (dlq, group) = (&for_terminal(dlq, NAME), for_terminal(self.group, NAME));
        let skipped = if self.skipped == 0 {
            String::new()
        } else {
            format!(", {} skipped", self.skipped)
        };
        if self.member.is_none() {
            println!(
                "dry run: {} record{} would be replayed from `{dlq}`{skipped}; nothing was sent{}",
                self.planned,
                if self.planned == 1 { "" } else { "s" },
                if self.args.yes {
                    ""
                } else {
                    " (add --yes to send)"
                }
            );
            return Ok(());
        }
        let progress = self.progress(&end);
        self.flush(progress).await?;
        self.bar.finish();
        if self.sent == 0 {
            println!(
                "replayed 0 records: nothing new in `{dlq}` matches{}; progress is kept under consumer group `{group}` (--restart to consider everything again)",
                if self.skipped == 0 {
                    String::new()
                } else {
                    format!(" ({} skipped)", self.skipped)
                },
            );
            return Ok(());
        }
        println!(
            "replayed {} record{} from `{dlq}` to {} (all acknowledged){skipped}; progress saved under consumer group `{group}`",
            self.sent,
            if self.sent == 1 { "" } else { "s" },
            self.targets
                .iter()
                .map(|t| for_terminal(t, NAME))
                .collect::<Vec<_>>()
                .join(", "),
        );
        Ok(())
    }
}

/// Waits for the next send at `rate` per second. Time lost elsewhere (a pause while another
/// replay was in the group, a slow acknowledgement) is not made up with a burst.
async fn pace(next: &mut Instant, rate: f64) {
    tokio::time::sleep_until((*next).into()).await;
    *next = next_send(*next, Instant::now(), rate);
}

/// When the record after one sent at `now` (due at `due`) may go.
fn next_send(due: Instant, now: Instant, rate: f64) -> Instant {
    now.max(due) + Duration::from_secs_f64(1.0 / rate)
}

/// `0:12, 1:40`.
fn positions(m: &HashMap<i32, i64>) -> String {
    let sorted: BTreeMap<_, _> = m.iter().collect();
    sorted
        .iter()
        .map(|(p, o)| format!("{p}:{o}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where a selected record goes and with what, or why it is skipped. Broker failures are
/// errors (the run stops), not skips.
async fn plan_one(
    kafka: &Kafka,
    args: &ReplayArgs,
    plan: &mut Plan,
    record: &Record,
    row: &Row,
) -> Result<Result<Planned, String>, Failure> {
    let (topic, envelope) =
        match target_of(&args.to, record, plan.config.as_ref(), &plan.all_topics) {
            Ok(t) => t,
            Err(why) => return Ok(Err(why)),
        };
    // Names come from envelopes (any bytes): ask the broker only about legal ones.
    if !legal_topic(&topic) {
        return Ok(Err(format!(
            "its target `{topic}` is not a legal topic name"
        )));
    }
    let count = match plan.partitions.get(&topic) {
        Some(n) => *n,
        None => {
            let n = match kafka.partitions(&topic).await {
                Ok(parts) => Some(i32::try_from(parts.len()).unwrap_or(i32::MAX)),
                Err(Failure::UnknownTopic(_)) => None,
                Err(e) => return Err(e),
            };
            if plan.partitions.len() >= TOPIC_CACHE {
                plan.partitions.clear();
            }
            plan.partitions.insert(topic.clone(), n);
            n
        }
    };
    let Some(count) = count else {
        return Ok(Err(format!("its target topic `{topic}` does not exist")));
    };
    // The record's content: its own, or for an `oversized` dead letter (kept without its
    // payload) the original's, read back from where the envelope says it is.
    let (key, payload, user) = match record.provenance() {
        Provenance::Sidetrack(e) if e.reason == Some(Reason::Oversized) => {
            if !legal_topic(&e.original_topic) {
                return Ok(Err(format!(
                    "oversized: its original topic `{}` is not a legal topic name",
                    e.original_topic
                )));
            }
            let at = format!(
                "{}[{}]@{}",
                e.original_topic, e.original_partition, e.original_offset
            );
            let original = match kafka
                .read_at(&e.original_topic, e.original_partition, e.original_offset)
                .await?
            {
                Ok(r) => r,
                Err(why) => {
                    return Ok(Err(format!(
                    "oversized: dead-lettered without its payload and the original is gone: {why}"
                )))
                }
            };
            if record.key.is_some() && original.key != record.key {
                return Ok(Err(format!(
                    "oversized: {at} holds another record now (its key differs)"
                )));
            }
            if let (Some(want), Some(got)) = (e.original_timestamp, original.timestamp) {
                if want != got {
                    return Ok(Err(format!(
                        "oversized: {at} holds another record now (its timestamp differs)"
                    )));
                }
            }
            let user = original.user_headers().to_vec();
            (original.key, original.payload, user)
        }
        // Spring's `kafka_dlt-*` headers are its envelope, not the user's: like sidetrack's,
        // they stay on the DLQ (sent back, a Spring consumer failing again would append a
        // second set after them).
        Provenance::Spring(_) => (
            record.key.clone(),
            record.payload.clone(),
            record
                .user_headers()
                .iter()
                .filter(|h| !h.key.starts_with(b"kafka_dlt-"))
                .cloned()
                .collect(),
        ),
        _ => (
            record.key.clone(),
            record.payload.clone(),
            record.user_headers().to_vec(),
        ),
    };
    // The original partition number when the target has it (retry topics do: they are
    // created with the source's partition count), else the key decides.
    let partition = row.original_partition.filter(|p| (0..count).contains(p));
    let mut headers: Vec<Header> = user
        .into_iter()
        .filter(|h| {
            ![REPLAY_ID, REPLAYED_AT, REPLAYED_FROM]
                .iter()
                .any(|n| h.is(n))
        })
        .collect();
    headers.push(Header::new(REPLAY_ID, plan.replay_id.clone()));
    headers.push(Header::new(REPLAYED_AT, plan.now.to_string()));
    headers.push(Header::new(
        REPLAYED_FROM,
        format!("{}:{}:{}", plan.dlq, record.partition, record.offset),
    ));
    if let Some(e) = envelope {
        headers.extend(e.to_headers());
    }
    Ok(Ok(Planned {
        dlq_partition: record.partition,
        dlq_offset: record.offset,
        topic,
        partition,
        key,
        payload,
        headers,
    }))
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
            let (topology, policy) = retry_route(&e, config, all_topics)?;
            // The record as its source first delivered it (attempt 1, no envelope), sent to
            // the first tier due at once: the library's next hop, as the runtime would write
            // it (a fresh envelope: one attempt, first failure and due time now).
            let mut original = Message::new(e.original_topic.clone(), Vec::new())
                .with_position(e.original_partition, e.original_offset);
            if let Some(ts) = e.original_timestamp {
                original = original.with_timestamp(ts);
            }
            let at_once = Disposition::Retry {
                tier: 0,
                delay: Duration::ZERO,
            };
            let error = format!("replayed from the dead-letter topic (was: {})", e.error);
            let hop = next_hop(
                &original,
                at_once,
                &error,
                &topology,
                &policy,
                now_ms(),
                0.0,
            )
            .map_err(|x| x.to_string())?;
            Ok((hop.topic.to_owned(), Some(hop.envelope)))
        }
        topic => Ok((topic.to_owned(), None)),
    }
}

/// The retry topology of the envelope's source topic and group: from `--config` when given,
/// else from the tiers that exist on the broker under the default naming pattern (the one with
/// the shortest delay becomes tier 0). Names are rendered and parsed by the library
/// ([`Topology`], [`tier_delay_of`]), never by a pattern of the CLI's own.
fn retry_route(
    e: &Envelope,
    config: Option<&Config>,
    all_topics: &[String],
) -> Result<(Topology, RetryPolicy), String> {
    let mut c = match config {
        Some(c) => c.clone(),
        None => {
            let pattern = RetryConfig::default().topic;
            let shortest = all_topics
                .iter()
                .filter_map(|t| tier_delay_of(&pattern, &e.original_topic, &e.group, t))
                .min()
                .ok_or_else(|| {
                    let wildcard = pattern
                        .replace("{topic}", &e.original_topic)
                        .replace("{group}", &e.group)
                        .replace("{delay}", "*");
                    format!("no retry topic `{wildcard}` exists; pass --config")
                })?;
            let mut c = Config::new("", e.group.clone(), [e.original_topic.clone()]);
            c.retry = RetryConfig::tiers([Tier::new(shortest, 1)]);
            c
        }
    };
    c.topics = vec![e.original_topic.clone()];
    c.group = e.group.clone();
    let policy = c.retry.policy().map_err(|x| x.to_string())?;
    if policy.tiers().is_empty() {
        return Err("the config has no retry tiers".to_owned());
    }
    let topology = Topology::new(&c, &policy).map_err(|x| x.to_string())?;
    Ok((topology, policy))
}

/// The progress group a replay uses unless `--progress-group` names one: derived from the
/// arguments as given (a relative `--since 1h` is the duration, not the time it resolves to),
/// so the same command run again, or by an alert on another instance, uses the same group and
/// sends nothing new. Stable across builds and Rust releases (FNV-1a, not `DefaultHasher`).
pub(crate) fn default_group(a: &ReplayArgs) -> String {
    let f = &a.filters;
    let fields: [(&str, Option<String>); 7] = [
        ("topic", Some(f.topic.clone())),
        ("since", f.since.map(|t| t.canonical())),
        ("until", f.until.map(|t| t.canonical())),
        // Matched case-insensitively: `Declined` and `declined` select the same records.
        ("error", f.error_contains.as_ref().map(|e| e.to_lowercase())),
        ("reason", f.reason.map(|r| r.as_str().to_owned())),
        ("key", f.key.clone()),
        ("to", Some(a.to.clone())),
    ];
    // Length-prefixed, so no two different selections write the same text.
    let mut text = String::from("sidetrack-replay/v2");
    for (name, value) in fields {
        match value {
            Some(v) => text.push_str(&format!(";{name}={}:{v}", v.len())),
            None => text.push_str(&format!(";{name}=-")),
        }
    }
    format!(
        "sidetrack-replay.{}.{:016x}",
        f.topic,
        fnv1a64(text.as_bytes())
    )
}

/// A running count on stderr when it is a terminal.
struct Progress {
    /// Records acknowledged so far.
    done: usize,
    /// Whether stderr is a terminal (a pipe or a log gets no carriage returns).
    on: bool,
}

impl Progress {
    /// A count at zero, shown only if stderr is a terminal.
    fn new() -> Self {
        Progress {
            done: 0,
            on: std::io::stderr().is_terminal(),
        }
    }
    /// Counts one acknowledged record: the first hundred one by one, then every hundredth, so a
    /// fast replay does not spend its time redrawing the line.
    fn tick(&mut self) {
        self.done += 1;
        if self.on && (self.done < 100 || self.done % 100 == 0) {
            eprint!("\rreplaying: {} acknowledged", self.done);
            let _ = std::io::stderr().flush();
        }
    }
    /// Ends the line with the final count, if anything was shown.
    fn finish(&self) {
        if self.on && self.done > 0 {
            eprintln!("\rreplaying: {} acknowledged", self.done);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Filters, Reason, TimeArg};

    #[test]
    fn pacing_does_not_make_up_for_lost_time_with_a_burst() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(next_send(t0, t0, 10.0), t0 + ms(100));
        // Sent a little late: the next one keeps the spacing.
        assert_eq!(next_send(t0, t0 + ms(30), 10.0), t0 + ms(130));
        // After a 5 s pause the next record waits its 100 ms like any other.
        assert_eq!(next_send(t0, t0 + ms(5_000), 10.0), t0 + ms(5_100));
    }

    fn args(since: Option<TimeArg>) -> ReplayArgs {
        ReplayArgs {
            filters: Filters {
                topic: "orders.billing.dlq".into(),
                since,
                until: None,
                error_contains: None,
                reason: None,
                key: None,
            },
            to: "original".into(),
            rate: None,
            limit: None,
            dry_run: false,
            yes: true,
            restart: false,
            progress_group: None,
            config: None,
        }
    }

    #[test]
    fn the_default_group_is_stable_and_follows_the_unresolved_arguments() {
        let hour = Some(TimeArg::Ago(Duration::from_secs(3600)));
        let a = default_group(&args(hour));
        // Pinned: a change here gives every existing replay a new group (all sent again).
        // FNV-1a 64 of `sidetrack-replay/v2;topic=18:orders.billing.dlq;since=13:ago:3600000ms;
        // until=-;error=-;reason=-;key=-;to=8:original`, computed independently.
        assert_eq!(a, "sidetrack-replay.orders.billing.dlq.92de39604d5c8baa");
        assert_eq!(a, default_group(&args(hour)), "run twice, same group");
        let two = default_group(&args(Some(TimeArg::Ago(Duration::from_secs(7200)))));
        assert_ne!(a, two);
        let at = default_group(&args(Some(TimeArg::At(3_600_000))));
        assert_ne!(a, at, "an absolute time is not a duration of the same size");
        assert_ne!(a, default_group(&args(None)));
        let mut reason = args(hour);
        reason.filters.reason = Some(Reason::Poison);
        assert_ne!(a, default_group(&reason));
        let mut lower = args(None);
        lower.filters.error_contains = Some("Card DECLINED".into());
        let mut upper = args(None);
        upper.filters.error_contains = Some("card declined".into());
        assert_eq!(default_group(&lower), default_group(&upper));
        // Length prefixes: moving text between fields is another selection.
        let mut k1 = args(None);
        k1.filters.key = Some("a;to=1:b".into());
        let mut k2 = args(None);
        k2.filters.key = Some("a".into());
        k2.to = "b".into();
        assert_ne!(default_group(&k1), default_group(&k2));
        // Not in the selection: how and how fast it is sent.
        let mut paced = args(hour);
        paced.rate = Some(10.0);
        paced.limit = Some(5);
        paced.dry_run = true;
        assert_eq!(a, default_group(&paced));
    }

    fn dead_letter() -> Envelope {
        Envelope {
            key_order_since: None,
            after_dead_letter: None,
            original_topic: "orders".into(),
            original_partition: 2,
            original_offset: 17,
            original_timestamp: Some(1_700_000_000_000),
            group: "billing".into(),
            attempts: 4,
            first_failure: 1_700_000_000_500,
            due: None,
            reason: Some(Reason::Exhausted),
            error: "down".into(),
        }
    }

    #[test]
    fn the_first_retry_tier_comes_from_the_library_topology() {
        let e = dead_letter();
        // With a config: its pattern and first tier, whatever the broker holds.
        let mut c = Config::new("b", "other-group", ["other-topic"]);
        c.retry = RetryConfig::tiers([
            Tier::new(Duration::from_secs(5), 1),
            Tier::new(Duration::from_secs(60), 1),
        ]);
        c.retry.topic = "{group}-{topic}-r{delay}".into();
        let (topology, _) = retry_route(&e, Some(&c), &[]).unwrap();
        assert_eq!(topology.sources()[0].retry[0].name, "billing-orders-r5s");
        // Without: the shortest tier on the broker under the default pattern.
        let topics = [
            "orders.billing.retry.1m",
            "orders.billing.retry.60s",
            "orders.billing.retry.250ms",
            "orders.other.retry.1ms",
            "orders.billing.dlq",
        ]
        .map(String::from);
        let (topology, _) = retry_route(&e, None, &topics).unwrap();
        assert_eq!(
            topology.sources()[0].retry[0].name,
            "orders.billing.retry.250ms"
        );
        // The envelope the record is replayed with: one attempt, due now, the original's
        // position; the same `next_hop` the runtime uses.
        let (to, fresh) = target_of(
            "first-retry",
            &Record {
                topic: "orders.billing.dlq".into(),
                partition: 0,
                offset: 3,
                timestamp: None,
                key: None,
                payload: None,
                headers: dead_letter().to_headers(),
            },
            None,
            &topics,
        )
        .unwrap();
        assert_eq!(to, "orders.billing.retry.250ms");
        let fresh = fresh.unwrap();
        assert_eq!((fresh.attempts, fresh.reason), (1, None));
        assert_eq!(fresh.due, Some(fresh.first_failure), "due at once");
        assert_eq!(
            (
                fresh.original_partition,
                fresh.original_offset,
                fresh.group.as_str()
            ),
            (2, 17, "billing")
        );
        assert_eq!(fresh.original_timestamp, Some(1_700_000_000_000));
        assert_eq!(
            fresh.error,
            "replayed from the dead-letter topic (was: down)"
        );
        assert_eq!(
            retry_route(&e, None, &topics[3..]).unwrap_err(),
            "no retry topic `orders.billing.retry.*` exists; pass --config"
        );
        let mut none = c.clone();
        none.retry = RetryConfig::tiers([]);
        assert_eq!(
            retry_route(&e, Some(&none), &[]).unwrap_err(),
            "the config has no retry tiers"
        );
    }
}

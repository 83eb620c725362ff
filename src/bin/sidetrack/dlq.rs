//! `dlq list` and `dlq show`: reading a dead-letter topic for a person or for `jq`.
//!
//! Both only read. A record is turned into a [`Row`] once (what the table, the JSON and the
//! filters see), and the filters ([`Filters::verdict`]) are the same code `dlq replay` selects
//! with, so `list` with the replay's filters shows exactly what the replay would send.
//!
//! Everything shown comes from the network: topic names, keys, headers and payloads are any
//! bytes a producer wrote. Every value goes through [`sidetrack::escape`] before it reaches
//! the terminal (control characters and bidi overrides are shown, not obeyed), every width is
//! capped ([`NAME`], [`TEXT`], [`JSON`]), and every number (timestamps, offsets, ages) is
//! formatted without overflow or panic, whatever an envelope says.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use sidetrack::admin::now_ms;
use sidetrack::dead_letter::{Provenance, Record, StartAt};
use sidetrack::escape::{for_cell, for_terminal, json_for_terminal};
use sidetrack::outcome::error_kind_str;
use sidetrack::Header;

use crate::kafka::{held_back, Kafka};
use crate::{Failure, Filters};

/// What `dlq list` shows of one record, also its JSON form.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// DLQ partition of the record.
    pub partition: i32,
    /// DLQ offset of the record; with the partition, what `dlq show` names.
    pub offset: i64,
    /// When it was dead-lettered, ms since the epoch.
    pub timestamp: Option<i64>,
    /// Seconds since it was dead-lettered, at the time the run started (0 if in the future).
    pub age_seconds: Option<i64>,
    /// `sidetrack`, `spring` or `none`.
    pub envelope: &'static str,
    /// Where the record was consumed from, per its envelope (`None` without one).
    pub original_topic: Option<String>,
    /// Partition it was consumed from; `dlq replay` sends to it again when the target has it.
    pub original_partition: Option<i32>,
    /// Offset it was consumed from.
    pub original_offset: Option<i64>,
    /// Consumer group that dead-lettered it.
    pub group: Option<String>,
    /// Handler calls it had, the failing ones included (sidetrack envelopes only).
    pub attempts: Option<u32>,
    /// `sidetrack-error-kind` (`permanent`, `exhausted`, …): what `--reason` matches.
    pub reason: Option<String>,
    /// The error text (sidetrack), or `class: message` of a Spring dead letter, or why there is no
    /// envelope; `--error-contains` matches it case-insensitively.
    pub error: String,
    /// The key as lossy UTF-8: what `--key` matches and what JSON shows.
    pub key: Option<String>,
    /// The key's bytes as they are, for display: `key` is lossy UTF-8 (for `--key` and JSON),
    /// which would show a non-UTF-8 byte as U+FFFD instead of what it is.
    #[serde(skip)]
    pub raw_key: Option<Vec<u8>>,
}

impl Row {
    /// [`Row::at`] with the wall clock now.
    pub fn of(r: &Record) -> Row {
        Row::at(r, now_ms())
    }

    /// The row as seen at `now` (ms since the epoch). Any record, any bytes: never panics.
    pub fn at(r: &Record, now: i64) -> Row {
        let mut row = Row {
            partition: r.partition,
            offset: r.offset,
            timestamp: r.timestamp,
            age_seconds: r.timestamp.map(|t| age_secs(now, t)),
            envelope: "none",
            original_topic: None,
            original_partition: None,
            original_offset: None,
            group: None,
            attempts: None,
            reason: None,
            error: String::new(),
            key: r
                .key
                .as_deref()
                .map(|k| String::from_utf8_lossy(k).into_owned()),
            raw_key: r.key.clone(),
        };
        match r.provenance() {
            Provenance::Sidetrack(e) => {
                row.envelope = "sidetrack";
                row.original_topic = Some(e.original_topic);
                row.original_partition = Some(e.original_partition);
                row.original_offset = Some(e.original_offset);
                row.group = Some(e.group);
                row.attempts = Some(e.attempts);
                row.reason = Some(error_kind_str(e.reason).to_owned());
                row.error = e.error;
            }
            Provenance::Spring(s) => {
                row.envelope = "spring";
                row.error = match (s.failed_class(), s.message.as_deref()) {
                    (Some(c), Some(m)) => format!("{c}: {m}"),
                    (c, m) => c.or(m).unwrap_or_default().to_owned(),
                };
                row.original_topic = s.original_topic;
                row.original_partition = s.original_partition;
                row.original_offset = s.original_offset;
                row.group = s.group;
            }
            Provenance::Unknown(e) => {
                row.error = format!("no sidetrack envelope ({e})");
            }
        }
        row
    }

    /// `topic[partition]@offset` of the original, the topic alone, or `-`, for the table's cell.
    pub fn original(&self) -> String {
        match (
            &self.original_topic,
            self.original_partition,
            self.original_offset,
        ) {
            (Some(t), Some(p), Some(o)) => format!("{t}[{p}]@{o}"),
            (Some(t), _, _) => t.clone(),
            _ => "-".to_owned(),
        }
    }
}

/// Whether the filters select a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Selected.
    Yes,
    /// Not selected, and no later run of the same command would select it.
    No,
    /// Not selected only because it is newer than a relative `--until`: a later run of the
    /// same command may select it, so replay progress must not pass it.
    NotYet,
}

impl Filters {
    /// Where a scan for these filters can start, for a run that started at `now`.
    pub fn start(&self, now: i64) -> StartAt {
        match self.since {
            Some(t) => StartAt::Time(t.resolve(now)),
            None => StartAt::Beginning,
        }
    }

    /// Whether `r` (whose row is `row`) is selected by a run that started at `now`. A record
    /// without a timestamp passes the time filters.
    pub fn verdict(&self, r: &Record, row: &Row, now: i64) -> Verdict {
        if let Some(reason) = self.reason {
            if row.reason.as_deref() != Some(reason.as_str()) {
                return Verdict::No;
            }
        }
        if let Some(key) = &self.key {
            if row.key.as_deref() != Some(key.as_str()) {
                return Verdict::No;
            }
        }
        if let Some(text) = &self.error_contains {
            if !row.error.to_lowercase().contains(&text.to_lowercase()) {
                return Verdict::No;
            }
        }
        let Some(t) = r.timestamp else {
            return Verdict::Yes;
        };
        if self.since.is_some_and(|since| t < since.resolve(now)) {
            // A relative --since only moves forward: it never selects this one later.
            return Verdict::No;
        }
        match self.until {
            Some(until) if t > until.resolve(now) => {
                if until.is_relative() {
                    Verdict::NotYet
                } else {
                    Verdict::No
                }
            }
            _ => Verdict::Yes,
        }
    }

    /// True if a run that started at `now` selects `r`.
    pub fn matches(&self, r: &Record, row: &Row, now: i64) -> bool {
        self.verdict(r, row, now) == Verdict::Yes
    }

    /// Refuses filters no record can pass (`--since` after `--until`, both resolved at `now`)
    /// with [`Failure::Usage`], so a typo is exit code 2, not an empty list.
    pub fn check(&self, now: i64) -> Result<(), Failure> {
        if let (Some(s), Some(u)) = (self.since, self.until) {
            if s.resolve(now) > u.resolve(now) {
                return Err(Failure::Usage("--since is later than --until".into()));
            }
        }
        Ok(())
    }
}

/// The rows of the selected records, in partition/offset order, and what an open transaction
/// held back (lines for stderr).
async fn select_rows(
    kafka: &Kafka,
    filters: &Filters,
    limit: Option<usize>,
) -> Result<(Vec<Row>, Vec<String>), Failure> {
    let now = now_ms();
    filters.check(now)?;
    let found = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&found);
    let f = filters.clone();
    let scanned = kafka
        .scan(&filters.topic, filters.start(now), move |r| {
            let row = Row::at(&r, now);
            if f.matches(&r, &row, now) {
                let mut v = sink.lock().unwrap_or_else(|e| e.into_inner());
                v.push(row);
                if limit.is_some_and(|l| v.len() >= l) {
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        })
        .await?;
    let held = held_back(
        &filters.topic,
        &scanned,
        "its records are not listed until it commits (run again then)",
    );
    let mut v = std::mem::take(&mut *found.lock().unwrap_or_else(|e| e.into_inner()));
    v.sort_by_key(|r| (r.partition, r.offset));
    Ok((v, held))
}

/// `dlq list`: the selected records as a table (escaped, one line each, cells cut to width)
/// or, with `--json`, as pretty JSON whose strings are escaped as `\uXXXX` so the same bytes
/// are safe on a terminal and exact for `jq`. What an open transaction held back is said on
/// stderr first: the list is complete only up to it.
pub(crate) async fn list(
    kafka: &Kafka,
    filters: &Filters,
    limit: Option<usize>,
    json: bool,
) -> Result<(), Failure> {
    let (rows, held) = select_rows(kafka, filters, limit).await?;
    // Said first on stderr, so it is seen whatever the output: an open transaction is not an
    // error (the rows are every committed record before it), but the list is not complete.
    for line in &held {
        eprintln!("{line}");
    }
    if json {
        // The exact values (for jq), with the characters a terminal would obey written as
        // `\uXXXX` escapes (the same JSON value).
        let text =
            serde_json::to_string_pretty(&rows).map_err(|e| Failure::Other(e.to_string()))?;
        println!("{}", json_for_terminal(&text, usize::MAX));
        return Ok(());
    }
    if rows.is_empty() {
        eprintln!(
            "no records in `{}` match",
            for_terminal(&filters.topic, NAME)
        );
        return Ok(());
    }
    println!(
        "{:<12} {:>6}  {:<28} {:>8}  {:<16} {:<50} KEY",
        "POSITION", "AGE", "ORIGINAL", "ATTEMPTS", "REASON", "ERROR"
    );
    for r in &rows {
        println!(
            "{:<12} {:>6}  {:<28} {:>8}  {:<16} {:<50} {}",
            format!("{}:{}", r.partition, r.offset),
            r.age_seconds.map(age).unwrap_or_else(|| "-".into()),
            for_cell(r.original(), 28),
            r.attempts
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into()),
            for_cell(r.reason.as_deref().unwrap_or("-"), 16),
            for_cell(&r.error, 50),
            r.raw_key
                .as_deref()
                .map(|k| for_cell(k, 40))
                .unwrap_or_else(|| "-".into()),
        );
    }
    eprintln!(
        "{} record{}",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" }
    );
    Ok(())
}

/// `dlq show PARTITION:OFFSET`: one record in full ([`describe`]).
///
/// # Errors
///
/// [`Failure::UnknownTopic`] when the topic does not exist and [`Failure::NotFound`] when the
/// partition or the offset does not (deleted by retention, past the end, or held back by an
/// open transaction, which the message says).
pub(crate) async fn show(
    kafka: &Kafka,
    topic: &str,
    (partition, offset): (i32, i64),
) -> Result<(), Failure> {
    let parts = kafka.partitions(topic).await?;
    if !parts.contains(&partition) {
        return Err(Failure::NotFound(format!(
            "`{topic}` has no partition {partition}"
        )));
    }
    let found = Arc::new(Mutex::new(None));
    let sink = Arc::clone(&found);
    let scanned = kafka
        .scan(
            topic,
            StartAt::Offsets(HashMap::from([(partition, offset)])),
            move |r| {
                if r.offset == offset {
                    *sink.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                }
                ControlFlow::Break(())
            },
        )
        .await?;
    let record = found
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .ok_or_else(|| {
            let why = match scanned.open.get(&partition) {
                Some(t) if offset >= t.stable_end => format!(
                    " (offsets from {} on are held back by a transaction that is still open)",
                    t.stable_end
                ),
                _ => String::new(),
            };
            Failure::NotFound(format!(
                "no record at {partition}:{offset} in `{topic}`{why}"
            ))
        })?;
    print!("{}", describe(&record));
    Ok(())
}

/// The full, human-readable description of one record. Any record, any bytes: never panics.
pub(crate) fn describe(r: &Record) -> String {
    describe_at(r, now_ms())
}

/// [`describe`] as seen at `now`.
pub(crate) fn describe_at(r: &Record, now: i64) -> String {
    let mut out = String::new();
    let when = r
        .timestamp
        .map(|t| format!("{} ({} ago)", time(t), age(age_secs(now, t))))
        .unwrap_or_else(|| "no timestamp".into());
    out += &format!(
        "record {}:{} of `{}`, dead-lettered {when}\n",
        r.partition,
        r.offset,
        for_terminal(&r.topic, NAME)
    );
    match r.provenance() {
        Provenance::Sidetrack(e) => {
            out += "envelope (sidetrack, version 1):\n";
            let mut field = |k: &str, v: String| out += &format!("  {k:<18} {v}\n");
            field("reason", error_kind_str(e.reason).to_owned());
            field("error", for_terminal(&e.error, TEXT));
            field(
                "original",
                format!(
                    "{}[{}]@{}",
                    for_terminal(&e.original_topic, NAME),
                    e.original_partition,
                    e.original_offset
                ),
            );
            field(
                "original time",
                e.original_timestamp.map(time).unwrap_or_else(|| "-".into()),
            );
            field("group", for_terminal(&e.group, NAME));
            field("attempts", e.attempts.to_string());
            field("first failure", time(e.first_failure));
            if let Some(due) = e.due {
                field("due", time(due));
            }
        }
        Provenance::Spring(s) => {
            out += "Spring Kafka dead letter (kafka_dlt-* headers):\n";
            // Any producer can write these headers: escaped like every other record bytes.
            let mut field = |k: &str, v: Option<String>| {
                out += &format!("  {k:<18} {}\n", v.unwrap_or_else(|| "-".into()))
            };
            let text = |v: &Option<String>, max| v.as_deref().map(|t| for_terminal(t, max));
            field("exception", text(&s.exception, TEXT));
            if s.cause.is_some() {
                field("cause", text(&s.cause, TEXT));
            }
            field("message", text(&s.message, TEXT));
            field("original topic", text(&s.original_topic, NAME));
            field(
                "original partition",
                s.original_partition.map(|p| p.to_string()),
            );
            field("original offset", s.original_offset.map(|o| o.to_string()));
            field("original time", s.original_timestamp.map(time));
            if s.original_timestamp_type.is_some() {
                field("timestamp type", text(&s.original_timestamp_type, NAME));
            }
            field("group", text(&s.group, NAME));
            if let Some(trace) = &s.stacktrace {
                out += &stack_trace(trace);
            }
        }
        Provenance::Unknown(e) => {
            out += &format!(
                "no sidetrack envelope ({})\n",
                for_terminal(e.to_string(), TEXT)
            )
        }
    }
    // The origin's trace (the producer's span, kept across every hand-off): validated hex,
    // printed as is, so on-call goes from a dead letter to its trace in one step.
    if let Some(trace) = sidetrack::telemetry::carrier::origin_trace_id(r.user_headers()) {
        out += &format!("origin trace: {trace}\n");
    }
    let user: Vec<&Header> = r
        .user_headers()
        .iter()
        .filter(|h| !h.key.starts_with(b"kafka_dlt-"))
        .collect();
    out += &format!("user headers ({}):\n", user.len());
    for h in user {
        let v = h
            .value
            .as_deref()
            .map(|v| for_terminal(v, TEXT))
            .unwrap_or_else(|| "(null)".into());
        out += &format!("  {:<18} {v}\n", for_terminal(&h.key, NAME));
    }
    out += &format!(
        "key: {}\n",
        r.key
            .as_deref()
            .map(|k| for_terminal(k, TEXT))
            .unwrap_or_else(|| "(null)".into())
    );
    match r.payload.as_deref() {
        None => out += "payload: (null, a tombstone)\n",
        Some(p) => match serde_json::from_slice::<serde_json::Value>(p) {
            Ok(v) => {
                out += &format!("payload ({} bytes, JSON):\n", p.len());
                out +=
                    &json_for_terminal(&serde_json::to_string_pretty(&v).unwrap_or_default(), JSON);
                out += "\n";
            }
            Err(_) => {
                out += &format!("payload ({} bytes, not JSON):\n", p.len());
                out += &for_terminal(p, TEXT);
                out += "\n";
            }
        },
    }
    out
}

/// Lines of a Java stack trace shown by `dlq show`; the rest is counted.
const STACK_LINES: usize = 30;

/// Spring's `kafka_dlt-exception-stacktrace`, indented, each line escaped like any other
/// bytes from the record, at most [`STACK_LINES`] lines.
fn stack_trace(trace: &str) -> String {
    let lines: Vec<&str> = trace.lines().collect();
    let mut out = format!("  stack trace ({} lines):\n", lines.len());
    for line in lines.iter().take(STACK_LINES) {
        out += &format!("    {}\n", for_terminal(line.replace('\t', "  "), TEXT));
    }
    if lines.len() > STACK_LINES {
        out += &format!("    … ({} more lines)\n", lines.len() - STACK_LINES);
    }
    out
}

/// Characters shown of a name (topic, group, header name): Kafka's own limit is 249.
const NAME: usize = 256;
/// Characters shown of a text (error, header value, key, payload not JSON).
const TEXT: usize = 2048;
/// Characters shown of a JSON payload (pretty-printed).
const JSON: usize = 16 * 1024;

/// An age for the table's `AGE` column, as short as stays readable: seconds under two
/// minutes, minutes under two hours, hours under two days, then days.
pub(crate) fn age(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Whole seconds from `t` to `now` (ms since the epoch), 0 for a time in the future. Both
/// come from the network or the clock: saturating, never an overflow.
pub(crate) fn age_secs(now: i64, t: i64) -> i64 {
    (now.saturating_sub(t) / 1000).max(0)
}

/// Last millisecond RFC 3339 can write (9999-12-31T23:59:59.999Z).
const MAX_RFC3339_MS: i64 = 253_402_300_799_999;

/// `ms` since the epoch as RFC 3339 with milliseconds; a time before 1970 or after 9999 (a
/// timestamp or envelope field can hold any i64) is shown as the raw number instead.
pub(crate) fn time(ms: i64) -> String {
    use std::fmt::Write as _;
    if (0..=MAX_RFC3339_MS).contains(&ms) {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.unsigned_abs());
        let mut out = String::new();
        if write!(out, "{}", humantime::format_rfc3339_millis(t)).is_ok() {
            return out;
        }
    }
    format!("{ms} ms since the epoch (not a calendar time)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Reason, TimeArg};
    use proptest::prelude::*;
    use sidetrack::retry::headers as names;
    use sidetrack::Envelope;
    use std::time::Duration;

    /// Header names a decoder reacts to, and anything else.
    fn header_name() -> impl Strategy<Value = Vec<u8>> {
        let known: Vec<Vec<u8>> = [
            names::VERSION,
            names::ORIGINAL_TOPIC,
            names::ORIGINAL_PARTITION,
            names::ORIGINAL_OFFSET,
            names::ORIGINAL_TIMESTAMP,
            names::GROUP,
            names::ATTEMPTS,
            names::FIRST_FAILURE,
            names::DUE,
            names::ERROR_KIND,
            names::ERROR,
            "kafka_dlt-original-topic",
            "kafka_dlt-original-partition",
            "kafka_dlt-original-offset",
            "kafka_dlt-original-timestamp",
            "kafka_dlt-original-consumer-group",
            "kafka_dlt-exception-fqcn",
            "kafka_dlt-exception-message",
        ]
        .iter()
        .map(|n| n.as_bytes().to_vec())
        .collect();
        prop_oneof![
            proptest::sample::select(known),
            proptest::collection::vec(any::<u8>(), 0..12),
        ]
    }

    /// Values that parse (numbers, kinds, binary numbers) and values that do not.
    fn header_value() -> impl Strategy<Value = Option<Vec<u8>>> {
        proptest::option::weighted(
            0.9,
            prop_oneof![
                any::<i64>().prop_map(|n| n.to_string().into_bytes()),
                any::<i64>().prop_map(|n| n.to_be_bytes().to_vec()),
                any::<i32>().prop_map(|n| n.to_be_bytes().to_vec()),
                proptest::sample::select(vec![
                    b"1".to_vec(),
                    b"permanent".to_vec(),
                    b"oversized".to_vec(),
                    b" 7 ".to_vec(),
                    Vec::new(),
                ]),
                proptest::collection::vec(any::<u8>(), 0..24),
            ],
        )
    }

    fn headers() -> impl Strategy<Value = Vec<Header>> {
        proptest::collection::vec(
            (header_name(), header_value()).prop_map(|(key, value)| Header { key, value }),
            0..14,
        )
    }

    fn record() -> impl Strategy<Value = Record> {
        (
            any::<i32>(),
            any::<i64>(),
            proptest::option::of(prop_oneof![
                Just(i64::MIN),
                Just(i64::MAX),
                Just(-1i64),
                any::<i64>()
            ]),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
            proptest::option::of(prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..64),
                Just(b"{\"a\": [1, 2, {\"b\": null}]}".to_vec()),
                Just("[".repeat(300).into_bytes()),
                proptest::collection::vec(any::<u8>(), 2040..2060),
            ]),
            headers(),
        )
            .prop_map(
                |(partition, offset, timestamp, key, payload, headers)| Record {
                    topic: "t.dlq".into(),
                    partition,
                    offset,
                    timestamp,
                    key,
                    payload,
                    headers,
                },
            )
    }

    fn time_arg() -> impl Strategy<Value = TimeArg> {
        prop_oneof![
            any::<u64>().prop_map(|s| TimeArg::Ago(Duration::from_secs(s))),
            Just(TimeArg::Ago(Duration::MAX)),
            any::<i64>().prop_map(TimeArg::At),
        ]
    }

    fn filters() -> impl Strategy<Value = Filters> {
        (
            proptest::option::of(time_arg()),
            proptest::option::of(time_arg()),
            proptest::option::of("[a-zA-Z ]{0,6}"),
            proptest::option::of(proptest::sample::select(Reason::ALL.to_vec())),
            proptest::option::of("[a-z]{0,3}"),
        )
            .prop_map(|(since, until, error_contains, reason, key)| Filters {
                topic: "t.dlq".into(),
                since,
                until,
                error_contains,
                reason,
                key,
            })
    }

    fn envelope() -> impl Strategy<Value = Envelope> {
        (
            "[a-z.]{1,12}",
            0..i32::MAX,
            0..i64::MAX,
            proptest::option::of(any::<i64>()),
            ".{0,8}",
            any::<u32>(),
            any::<i64>(),
            proptest::option::of(any::<i64>()),
            proptest::sample::select(Reason::ALL.to_vec()),
            ".{0,40}",
        )
            .prop_map(
                |(topic, p, o, ts, group, attempts, first, due, kind, error)| Envelope {
                    key_order_since: None,
                    after_dead_letter: None,
                    original_topic: topic,
                    original_partition: p,
                    original_offset: o,
                    original_timestamp: ts,
                    group,
                    attempts,
                    first_failure: first,
                    due,
                    reason: Some(kind),
                    error,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any record, any clock: rows, descriptions and filters never panic, and what the row
        /// says about the envelope is what the envelope says, or why it could not be read.
        #[test]
        fn any_record_is_listed_shown_and_filtered(
            r in record(),
            f in filters(),
            now in prop_oneof![any::<i64>(), Just(i64::MIN), Just(i64::MAX)],
        ) {
            let row = Row::at(&r, now);
            let text = describe_at(&r, now);
            // Whatever the bytes: every line is the description's own, nothing a terminal
            // obeys, and the length is bounded (payload shown up to 16 Ki characters).
            prop_assert!(!text.chars().any(|c| c.is_control() && c != '\n'), "{:?}", text);
            prop_assert!(text.chars().count() < 64 * 1024);
            let _ = f.verdict(&r, &row, now);
            let _ = f.check(now);
            let _ = f.start(now);
            prop_assert!(row.age_seconds.is_none_or(|a| a >= 0));
            let _ = serde_json::to_string(&row).unwrap();
            let _ = row.original();
            match r.provenance() {
                Provenance::Sidetrack(e) => {
                    prop_assert_eq!(row.envelope, "sidetrack");
                    prop_assert_eq!(row.original_topic.as_deref(), Some(e.original_topic.as_str()));
                    prop_assert_eq!(row.original_partition, Some(e.original_partition));
                    prop_assert_eq!(row.original_offset, Some(e.original_offset));
                    prop_assert_eq!(row.reason.as_deref(), Some(error_kind_str(e.reason)));
                    prop_assert!(text.contains("envelope (sidetrack, version 1)"));
                }
                Provenance::Spring(s) => {
                    prop_assert_eq!(row.envelope, "spring");
                    prop_assert_eq!(row.original_partition, s.original_partition);
                    prop_assert!(text.contains("Spring Kafka dead letter"));
                }
                Provenance::Unknown(e) => {
                    prop_assert_eq!(row.envelope, "none");
                    // Not readable, and the reason says why.
                    let why = e.to_string();
                    prop_assert!(row.error.contains(&why), "{} / {}", row.error, why);
                    prop_assert!(text.contains(&for_terminal(&why, TEXT)));
                }
            }
        }

        /// A sidetrack envelope behind any user headers is read with its meaning.
        #[test]
        fn an_envelope_behind_any_user_headers_is_read_right(
            e in envelope(),
            user in headers(),
            mut r in record(),
        ) {
            let mut hs = user.clone();
            hs.extend(e.to_headers());
            r.headers = hs;
            let row = Row::at(&r, 0);
            prop_assert_eq!(row.envelope, "sidetrack");
            prop_assert_eq!(row.original_topic, Some(e.original_topic.clone()));
            prop_assert_eq!(row.original_partition, Some(e.original_partition));
            prop_assert_eq!(row.original_offset, Some(e.original_offset));
            prop_assert_eq!(row.group, Some(e.group.clone()));
            prop_assert_eq!(row.attempts, Some(e.attempts));
            prop_assert_eq!(row.reason.as_deref(), Some(error_kind_str(e.reason)));
            prop_assert_eq!(r.user_headers(), &user[..]);
            let shown = user.iter().filter(|h| !h.key.starts_with(b"kafka_dlt-")).count();
            let needle = format!("user headers ({shown}):");
            let text = describe_at(&r, i64::MAX);
            prop_assert!(text.contains(&needle), "{}", text);
        }

        #[test]
        fn time_and_age_take_any_i64(ms in any::<i64>(), now in any::<i64>()) {
            let shown = time(ms);
            if (0..=MAX_RFC3339_MS).contains(&ms) {
                // Read back to the millisecond.
                let back = humantime::parse_rfc3339_weak(&shown).unwrap();
                prop_assert_eq!(sidetrack::admin::epoch_ms(back), ms);
            } else {
                prop_assert!(shown.contains("not a calendar time"));
            }
            prop_assert!(age_secs(now, ms) >= 0);
            let _ = age(age_secs(now, ms));
        }
    }

    fn rec(timestamp: Option<i64>) -> Record {
        Record {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            timestamp,
            key: None,
            payload: None,
            headers: Vec::new(),
        }
    }

    fn only_time(since: Option<TimeArg>, until: Option<TimeArg>) -> Filters {
        Filters {
            topic: "t".into(),
            since,
            until,
            error_contains: None,
            reason: None,
            key: None,
        }
    }

    /// `dlq show` names the origin's trace: the kept origin context when the record was handed
    /// off (its own `traceparent` is then the hand-off's), else its own `traceparent`.
    #[test]
    fn show_prints_the_origin_trace_id() {
        let origin = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let hand_off = "00-12345678901234567890123456789012-1234567890123456-01";
        let r = Record {
            headers: vec![
                Header::new("traceparent", hand_off.as_bytes().to_vec()),
                Header::new("sidetrack-origin-traceparent", origin.as_bytes().to_vec()),
            ],
            ..rec(None)
        };
        assert!(describe_at(&r, 0).contains("origin trace: 4bf92f3577b34da6a3ce929d0e0e4736\n"));
        let own = Record {
            headers: vec![Header::new("traceparent", origin.as_bytes().to_vec())],
            ..rec(None)
        };
        assert!(describe_at(&own, 0).contains("origin trace: 4bf92f3577b34da6a3ce929d0e0e4736\n"));
        assert!(!describe_at(&rec(None), 0).contains("origin trace"));
    }

    /// As Spring Kafka 4.1's `DeadLetterPublishingRecoverer` writes them after a listener
    /// container's listener threw (tests/interop.rs checks this against the real library).
    #[test]
    fn spring_dead_letters_show_the_root_cause_and_a_bounded_escaped_stack_trace() {
        let mut trace = String::from(
            "org.springframework.kafka.listener.ListenerExecutionFailedException: Listener failed\n",
        );
        for i in 0..40 {
            trace += &format!("\tat a.B.c{i}(B.java:{i})\n");
        }
        trace += "Caused by: java.lang.IllegalStateException: declined \x1b[31mred\n";
        let r = Record {
            key: Some(b"\xff\x00k".to_vec()),
            headers: vec![
                Header::new("trace", b"t-1".to_vec()),
                Header::new(
                    "kafka_dlt-exception-fqcn",
                    b"org.springframework.kafka.listener.ListenerExecutionFailedException".to_vec(),
                ),
                Header::new(
                    "kafka_dlt-exception-cause-fqcn",
                    b"java.lang.IllegalStateException".to_vec(),
                ),
                Header::new(
                    "kafka_dlt-exception-message",
                    b"Listener failed; declined \x1b[31mred".to_vec(),
                ),
                Header::new("kafka_dlt-exception-stacktrace", trace.into_bytes()),
                Header::new("kafka_dlt-original-timestamp-type", b"CreateTime".to_vec()),
            ],
            ..rec(None)
        };
        let row = Row::at(&r, 0);
        assert_eq!(
            row.error,
            "java.lang.IllegalStateException: Listener failed; declined \x1b[31mred"
        );
        assert_eq!(for_cell(row.raw_key.as_deref().unwrap(), 40), r"\xff\x00k");
        let text = describe_at(&r, 0);
        for line in [
            "  exception          org.springframework.kafka.listener.ListenerExecutionFailedException",
            "  cause              java.lang.IllegalStateException",
            r"  message            Listener failed; declined \x1b[31mred",
            "  timestamp type     CreateTime",
            "  stack trace (42 lines):",
            "      at a.B.c0(B.java:0)",
            "    … (12 more lines)",
            "user headers (1):",
            r"key: \xff\x00k",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
        assert!(!text.contains('\x1b'), "{text}");
        assert!(
            !text.contains("c29("),
            "30 lines of the trace at most:\n{text}"
        );
    }

    #[test]
    fn until_is_inclusive_to_the_millisecond() {
        let f = only_time(Some(TimeArg::At(1_000)), Some(TimeArg::At(1_999)));
        let v = |t| f.verdict(&rec(Some(t)), &Row::at(&rec(Some(t)), 0), 5_000);
        assert_eq!(v(999), Verdict::No);
        assert_eq!(v(1_000), Verdict::Yes);
        assert_eq!(v(1_999), Verdict::Yes);
        assert_eq!(v(2_000), Verdict::No);
        // No timestamp: the time filters do not apply.
        assert_eq!(
            f.verdict(&rec(None), &Row::at(&rec(None), 0), 5_000),
            Verdict::Yes
        );
    }

    #[test]
    fn only_a_relative_until_holds_records_for_a_later_run() {
        let now = 10_000_000;
        let relative = only_time(None, Some(TimeArg::Ago(Duration::from_secs(60))));
        let newer = rec(Some(now - 1_000));
        assert_eq!(
            relative.verdict(&newer, &Row::at(&newer, now), now),
            Verdict::NotYet
        );
        let absolute = only_time(None, Some(TimeArg::At(now - 60_000)));
        assert_eq!(
            absolute.verdict(&newer, &Row::at(&newer, now), now),
            Verdict::No
        );
        // An older record than a relative --since never matches later either.
        let since = only_time(Some(TimeArg::Ago(Duration::from_secs(60))), None);
        let older = rec(Some(now - 120_000));
        assert_eq!(
            since.verdict(&older, &Row::at(&older, now), now),
            Verdict::No
        );
    }
}

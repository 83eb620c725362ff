//! `dlq list` and `dlq show`.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use sidetrack::dead_letter::{Provenance, Record, StartAt};
use sidetrack::Header;

use crate::kafka::Kafka;
use crate::{Failure, Filters};

/// What `dlq list` shows of one record, also its JSON form.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub partition: i32,
    pub offset: i64,
    /// When it was dead-lettered, ms since the epoch.
    pub timestamp: Option<i64>,
    pub age_seconds: Option<i64>,
    /// `sidetrack`, `spring` or `none`.
    pub envelope: &'static str,
    pub original_topic: Option<String>,
    pub original_partition: Option<i32>,
    pub original_offset: Option<i64>,
    pub group: Option<String>,
    pub attempts: Option<u32>,
    pub reason: Option<String>,
    pub error: String,
    pub key: Option<String>,
}

impl Row {
    pub fn of(r: &Record) -> Row {
        let now = now_ms();
        let mut row = Row {
            partition: r.partition,
            offset: r.offset,
            timestamp: r.timestamp,
            age_seconds: r.timestamp.map(|t| ((now - t) / 1000).max(0)),
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
        };
        match r.provenance() {
            Provenance::Sidetrack(e) => {
                row.envelope = "sidetrack";
                row.original_topic = Some(e.original_topic);
                row.original_partition = Some(e.original_partition);
                row.original_offset = Some(e.original_offset);
                row.group = Some(e.group);
                row.attempts = Some(e.attempts);
                row.reason = Some(e.error_kind.as_str().to_owned());
                row.error = e.error;
            }
            Provenance::Spring(s) => {
                row.envelope = "spring";
                row.original_topic = s.original_topic;
                row.original_partition = s.original_partition;
                row.original_offset = s.original_offset;
                row.group = s.group;
                row.error = match (s.exception, s.message) {
                    (Some(c), Some(m)) => format!("{c}: {m}"),
                    (c, m) => c.or(m).unwrap_or_default(),
                };
            }
            Provenance::Unknown(e) => {
                row.error = format!("no sidetrack envelope ({e})");
            }
        }
        row
    }

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

impl Filters {
    /// Where a scan for these filters can start.
    pub fn start(&self) -> StartAt {
        match self.since {
            Some(t) => StartAt::Time(t),
            None => StartAt::Beginning,
        }
    }

    pub fn matches(&self, r: &Record, row: &Row) -> bool {
        if let Some(since) = self.since {
            if r.timestamp.is_some_and(|t| t < since) {
                return false;
            }
        }
        if let Some(until) = self.until {
            if r.timestamp.is_some_and(|t| t > until) {
                return false;
            }
        }
        if let Some(reason) = self.reason {
            if row.reason.as_deref() != Some(reason.as_str()) {
                return false;
            }
        }
        if let Some(key) = &self.key {
            if row.key.as_deref() != Some(key.as_str()) {
                return false;
            }
        }
        if let Some(text) = &self.error_contains {
            if !row.error.to_lowercase().contains(&text.to_lowercase()) {
                return false;
            }
        }
        true
    }

    pub fn check(&self) -> Result<(), Failure> {
        if let (Some(s), Some(u)) = (self.since, self.until) {
            if s > u {
                return Err(Failure::Usage("--since is later than --until".into()));
            }
        }
        Ok(())
    }
}

/// Selected records, in partition/offset order.
pub async fn select(
    kafka: &Kafka,
    filters: &Filters,
    start: StartAt,
    limit: Option<usize>,
) -> Result<Vec<(Record, Row)>, Failure> {
    filters.check()?;
    let found = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&found);
    let f = filters.clone();
    kafka
        .scan(&filters.topic, start, move |r| {
            let row = Row::of(&r);
            if f.matches(&r, &row) {
                let mut v = sink.lock().unwrap_or_else(|e| e.into_inner());
                v.push((r, row));
                if limit.is_some_and(|l| v.len() >= l) {
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        })
        .await?;
    let mut v = std::mem::take(&mut *found.lock().unwrap_or_else(|e| e.into_inner()));
    v.sort_by_key(|(r, _)| (r.partition, r.offset));
    Ok(v)
}

pub async fn list(
    kafka: &Kafka,
    filters: &Filters,
    limit: Option<usize>,
    json: bool,
) -> Result<(), Failure> {
    let rows: Vec<Row> = select(kafka, filters, filters.start(), limit)
        .await?
        .into_iter()
        .map(|(_, row)| row)
        .collect();
    if json {
        let text =
            serde_json::to_string_pretty(&rows).map_err(|e| Failure::Other(e.to_string()))?;
        println!("{text}");
        return Ok(());
    }
    if rows.is_empty() {
        eprintln!("no records in `{}` match", filters.topic);
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
            cut(&r.original(), 28),
            r.attempts
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into()),
            r.reason.as_deref().unwrap_or("-"),
            cut(&r.error, 50),
            cut(r.key.as_deref().unwrap_or("-"), 40),
        );
    }
    eprintln!(
        "{} record{}",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" }
    );
    Ok(())
}

pub async fn show(
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
    kafka
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
            Failure::NotFound(format!("no record at {partition}:{offset} in `{topic}`"))
        })?;
    print!("{}", describe(&record));
    Ok(())
}

/// The full, human-readable description of one record.
pub fn describe(r: &Record) -> String {
    let mut out = String::new();
    let when = r
        .timestamp
        .map(|t| format!("{} ({} ago)", time(t), age(((now_ms() - t) / 1000).max(0))))
        .unwrap_or_else(|| "no timestamp".into());
    out += &format!(
        "record {}:{} of `{}`, dead-lettered {when}\n",
        r.partition, r.offset, r.topic
    );
    match r.provenance() {
        Provenance::Sidetrack(e) => {
            out += "envelope (sidetrack, version 1):\n";
            let mut field = |k: &str, v: String| out += &format!("  {k:<18} {v}\n");
            field("reason", e.error_kind.as_str().to_owned());
            field("error", e.error.clone());
            field(
                "original",
                format!(
                    "{}[{}]@{}",
                    e.original_topic, e.original_partition, e.original_offset
                ),
            );
            field(
                "original time",
                e.original_timestamp.map(time).unwrap_or_else(|| "-".into()),
            );
            field("group", e.group.clone());
            field("attempts", e.attempts.to_string());
            field("first failure", time(e.first_failure));
            if let Some(due) = e.due {
                field("due", time(due));
            }
        }
        Provenance::Spring(s) => {
            out += "Spring Kafka dead letter (kafka_dlt-* headers):\n";
            let mut field = |k: &str, v: Option<String>| {
                out += &format!("  {k:<18} {}\n", v.unwrap_or_else(|| "-".into()))
            };
            field("exception", s.exception.clone());
            field("message", s.message.clone());
            field("original topic", s.original_topic.clone());
            field(
                "original partition",
                s.original_partition.map(|p| p.to_string()),
            );
            field("original offset", s.original_offset.map(|o| o.to_string()));
            field("original time", s.original_timestamp.map(time));
            field("group", s.group.clone());
        }
        Provenance::Unknown(e) => out += &format!("no sidetrack envelope ({e})\n"),
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
            .map(preview)
            .unwrap_or_else(|| "(null)".into());
        out += &format!("  {:<18} {v}\n", preview(&h.key));
    }
    out += &format!(
        "key: {}\n",
        r.key
            .as_deref()
            .map(preview)
            .unwrap_or_else(|| "(null)".into())
    );
    match r.payload.as_deref() {
        None => out += "payload: (null, a tombstone)\n",
        Some(p) => match serde_json::from_slice::<serde_json::Value>(p) {
            Ok(v) => {
                out += &format!("payload ({} bytes, JSON):\n", p.len());
                out += &serde_json::to_string_pretty(&v).unwrap_or_default();
                out += "\n";
            }
            Err(_) => {
                out += &format!("payload ({} bytes, not JSON):\n", p.len());
                out += &preview(p);
                out += "\n";
            }
        },
    }
    out
}

/// Text as is when it is printable UTF-8, else escaped; at most 2 KiB shown.
fn preview(bytes: &[u8]) -> String {
    const MAX: usize = 2048;
    let shown = &bytes[..bytes.len().min(MAX)];
    let mut s = match std::str::from_utf8(shown) {
        Ok(t) if !t.chars().any(|c| c.is_control() && c != '\n' && c != '\t') => t.to_owned(),
        _ => shown
            .iter()
            .flat_map(|b| std::ascii::escape_default(*b))
            .map(char::from)
            .collect(),
    };
    if bytes.len() > MAX {
        s += &format!("… ({} more bytes)", bytes.len() - MAX);
    }
    s
}

fn cut(s: &str, n: usize) -> String {
    let one_line = s.replace(['\n', '\r', '\t'], " ");
    if one_line.chars().count() <= n {
        one_line
    } else {
        let mut t: String = one_line.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

pub fn age(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

pub fn time(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

pub fn now_ms() -> i64 {
    crate::ms(std::time::SystemTime::now())
}

//! `topology` and `lag`: what a runtime's side topics are, and how far behind its groups are.
//!
//! Both only read (except `topology --create`, which creates missing side topics through the
//! library's own provisioning, [`sidetrack::runtime::check_topics`], so the topics it makes
//! are the ones a runtime would make).

use std::path::Path;

use sidetrack::escape::for_terminal;
use sidetrack::retry::Topology;
use sidetrack::Config;

use crate::kafka::Kafka;
use crate::Failure;

/// Prints the retry tiers and dead-letter topic of each source topic, with whether each
/// exists, and creates the missing ones when `create` is set.
///
/// The names come from the library's [`Topology`], rendered from `--config` (or the defaults)
/// with `--topic`/`--group` laid over it, so they are exactly the names a runtime with that
/// config uses. `-X` properties are passed to the provisioning client. A config that does not
/// validate is a usage error (exit 2).
pub(crate) async fn topology(
    kafka: &Kafka,
    topics: &[String],
    group: Option<&str>,
    config_path: Option<&Path>,
    create: bool,
) -> Result<(), Failure> {
    let mut config = match config_path {
        Some(p) => Config::from_file(p).map_err(|e| Failure::Usage(e.to_string()))?,
        None => Config::default(),
    };
    config.brokers = kafka.brokers.clone();
    if !topics.is_empty() {
        config.topics = topics.to_vec();
    }
    if let Some(g) = group {
        config.group = g.to_owned();
    }
    if config.topics.is_empty() || config.group.is_empty() {
        return Err(Failure::Usage(
            "give --topic and --group, or a --config that sets them".into(),
        ));
    }
    for (k, v) in kafka.config.config_map().iter() {
        if *k != "bootstrap.servers" {
            config.producer.insert(k.to_string(), v.to_string());
        }
    }
    config.provisioning.timeout = kafka.timeout;
    config
        .validate()
        .map_err(|e| Failure::Usage(e.to_string()))?;
    let policy = config
        .retry
        .policy()
        .map_err(|e| Failure::Usage(e.to_string()))?;
    let topology = Topology::new(&config, &policy).map_err(|e| Failure::Usage(e.to_string()))?;
    let status = sidetrack::runtime::check_topics(&config, create).await?;
    let state = |name: &str| {
        status
            .iter()
            .find(|s| s.name == name)
            .map(|s| match (s.partitions, s.created) {
                (Some(n), true) => format!("created ({n} partitions)"),
                (Some(n), false) => format!("exists ({n} partitions)"),
                (None, _) => "MISSING".to_owned(),
            })
            .unwrap_or_default()
    };
    println!(
        "group `{}` (retry consumer group `{}`)",
        name(topology.group()),
        name(topology.retry_group())
    );
    let mut attempt = 1u32;
    for s in topology.sources() {
        println!();
        println!(
            "{:<16} {:<44} {}",
            "attempt 1",
            name(&s.topic),
            state(&s.topic)
        );
        for (i, t) in s.retry.iter().enumerate() {
            let first = attempt + 1;
            attempt += t.attempts;
            let attempts = if t.attempts == 1 {
                format!("attempt {first}")
            } else {
                format!("attempts {first}-{attempt}")
            };
            let label = format!("tier {i}");
            let what = format!(
                "delay {}, {attempts}; {}",
                humantime::format_duration(t.delay),
                state(&t.name)
            );
            println!("{label:<16} {:<44} {what}", name(&t.name));
        }
        let what = format!(
            "after attempt {attempt} or a permanent error; {}",
            state(&s.dead_letter)
        );
        println!("{:<16} {:<44} {what}", "dead letters", name(&s.dead_letter));
        if let Some(log) = &s.key_order {
            let what = format!(
                "keep_key_order: records held behind a retried record of their key; {}",
                state(log)
            );
            println!("{:<16} {:<44} {what}", "key-order log", name(log));
        }
        attempt = 1;
    }
    let missing: Vec<&str> = status
        .iter()
        .filter(|s| s.partitions.is_none())
        .map(|s| s.name.as_str())
        .collect();
    if !missing.is_empty() && !create {
        eprintln!(
            "{} topic{} missing; run again with --create to create {}",
            missing.len(),
            if missing.len() == 1 { " is" } else { "s are" },
            if missing.len() == 1 { "it" } else { "them" }
        );
    }
    Ok(())
}

/// Prints committed offset, end offset and lag per partition of `group` on its source topics,
/// of `GROUP.retry` on the retry tiers, how many events of each key-order log (`keep_key_order`)
/// are not yet done (held records and their markers: `N held`), and how many records each
/// dead-letter topic holds.
///
/// Without `--topic` the sources are every topic the group has committed offsets on. Retry
/// tiers are found by the default naming pattern (`{topic}.{group}.retry.{delay}`), sorted by
/// delay; lag is clamped at 0, since a broker may report an end offset below a commit.
pub(crate) async fn lag(kafka: &Kafka, group: &str, topic: Option<&str>) -> Result<(), Failure> {
    let all = kafka.topic_names().await?;
    let sources: Vec<String> = match topic {
        Some(t) => {
            kafka.partitions(t).await?;
            vec![t.to_owned()]
        }
        None => {
            // Every topic the group has committed offsets on, except its own side topics.
            let mut found = Vec::new();
            for t in all
                .iter()
                .filter(|t| !t.starts_with("__") && !t.contains(&format!(".{group}.")))
            {
                if !kafka.committed(group, t).await?.is_empty() {
                    found.push(t.clone());
                }
            }
            if found.is_empty() {
                return Err(Failure::NotFound(format!(
                    "group `{group}` has no committed offsets; pass --topic"
                )));
            }
            found
        }
    };
    let retry_group = format!("{group}.retry");
    println!(
        "{:<44} {:>9}  {:<24} {:>12} {:>12} {:>10}",
        "TOPIC", "PARTITION", "GROUP", "COMMITTED", "END", "LAG"
    );
    for source in &sources {
        let prefix = format!("{source}.{group}.retry.");
        let mut tiers: Vec<(std::time::Duration, &String)> = all
            .iter()
            .filter_map(|t| Some((humantime::parse_duration(t.strip_prefix(&prefix)?).ok()?, t)))
            .collect();
        tiers.sort();
        let mut rows: Vec<(&str, &str)> = vec![(source.as_str(), group)];
        rows.extend(
            tiers
                .iter()
                .map(|(_, t)| (t.as_str(), retry_group.as_str())),
        );
        for (t, g) in rows {
            let marks = kafka.watermarks(t).await?;
            let committed = kafka.committed(g, t).await?;
            let mut parts: Vec<_> = marks.into_iter().collect();
            parts.sort();
            for (p, (low, high)) in parts {
                let c = committed.get(&p).copied();
                // Clamped: a broker that under-reports its end offset must not show negative lag.
                let lag = (high - c.unwrap_or(low).max(low)).max(0);
                println!(
                    "{:<44} {:>9}  {:<24} {:>12} {:>12} {:>10}",
                    name(t),
                    p,
                    name(g),
                    c.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
                    high,
                    lag
                );
            }
        }
        // keep_key_order: the key-order log, read from `GROUP.key-order`'s position; what is
        // past it are held records (and their head/release markers) not yet done.
        let log = sidetrack::retry::key_order_topic(source, group);
        if all.contains(&log) {
            let log_group = format!("{group}.key-order");
            let committed = kafka.committed(&log_group, &log).await?;
            let mut parts: Vec<_> = kafka.watermarks(&log).await?.into_iter().collect();
            parts.sort();
            for (p, (low, high)) in parts {
                let c = committed.get(&p).copied();
                let held = (high - c.unwrap_or(low).max(low)).max(0);
                println!(
                    "{:<44} {:>9}  {:<24} {:>12} {:>12} {:>10}",
                    name(&log),
                    p,
                    name(&log_group),
                    c.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
                    high,
                    format!("{held} held")
                );
            }
        }
        let dlq = format!("{source}.{group}.dlq");
        if all.contains(&dlq) {
            let mut parts: Vec<_> = kafka.watermarks(&dlq).await?.into_iter().collect();
            parts.sort();
            for (p, (low, high)) in parts {
                println!(
                    "{:<44} {:>9}  {:<24} {:>12} {:>12} {:>10}",
                    name(&dlq),
                    p,
                    "(dead letters)",
                    "-",
                    high,
                    format!("{} held", high - low)
                );
            }
        }
    }
    Ok(())
}

/// A topic or group name as shown: names come from the broker, the config or the command
/// line, and are escaped like everything else printed.
fn name(s: &str) -> String {
    for_terminal(s, 256)
}

//! `sidetrack`: the on-call tool for sidetrack's dead-letter and retry topics.
//!
//! Exit codes: 0 success, 1 other failure, 2 bad arguments or filters, 3 brokers unreachable,
//! 4 unknown topic, 5 record not found.
#![warn(unreachable_pub)]

mod dlq;
mod kafka;
#[cfg(feature = "proxy")]
mod proxy;
mod replay;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use sidetrack::admin::epoch_ms;

/// Printed after `--help`: one example per subcommand and the exit codes, so on-call has a
/// command to adapt without opening the runbook. Kept in step with `docs/runbook.md`.
const AFTER_HELP: &str = "\
Examples:
  sidetrack dlq list --topic orders.billing.dlq --since 1h
  sidetrack dlq show --topic orders.billing.dlq 0:42
  sidetrack dlq replay --topic orders.billing.dlq --reason exhausted --dry-run
  sidetrack topology --topic orders --group billing --create
  sidetrack lag --group billing --topic orders
  sidetrack proxy --listen 0.0.0.0:8082 --config proxy.toml

Exit codes: 0 ok, 1 failure, 2 bad arguments, 3 brokers unreachable, 4 unknown topic,
5 record not found.";

/// Inspect, filter and safely replay sidetrack dead-letter topics; show the retry topology and
/// consumer lag.
#[derive(Parser, Debug)]
#[command(name = "sidetrack", version, after_help = AFTER_HELP)]
struct Cli {
    /// Kafka bootstrap servers.
    #[arg(
        long,
        env = "KAFKA_BROKERS",
        global = true,
        value_name = "HOST:PORT,.."
    )]
    brokers: Option<String>,
    /// A librdkafka property for every client, like kcat (repeatable), e.g.
    /// `-X security.protocol=SASL_SSL`.
    #[arg(short = 'X', value_name = "KEY=VALUE", global = true)]
    property: Vec<String>,
    /// Give up on the brokers after this long.
    #[arg(long, default_value = "10s", global = true, value_parser = parse_duration)]
    timeout: Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Work with a dead-letter topic.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Show the retry tiers and dead-letter topic a runtime uses; create missing ones.
    Topology(TopologyArgs),
    /// Per-partition lag of a group on its main, retry and dead-letter topics.
    Lag(LagArgs),
    /// Serve the HTTP produce proxy (Confluent REST v2 compatible). Without --brokers or
    /// KAFKA_BROKERS it starts an embedded broker with a demo topic.
    #[cfg(feature = "proxy")]
    Proxy(proxy::ProxyArgs),
}

#[derive(Subcommand, Debug)]
enum DlqCommand {
    /// One line per dead-lettered record: position, age, origin, attempts, reason, error, key.
    List(ListArgs),
    /// Everything about one record: envelope, user headers, key and payload.
    Show(ShowArgs),
    /// Put selected records back (original topic, first retry tier, or any topic).
    ///
    /// Writes nothing without --yes. Progress is kept under a consumer group of its own on the
    /// dead-letter topic, so running the same replay again sends nothing new.
    Replay(ReplayArgs),
}

/// Which records of the dead-letter topic to consider.
#[derive(Args, Debug, Clone)]
pub struct Filters {
    /// The dead-letter topic, e.g. `orders.billing.dlq`.
    #[arg(long)]
    pub topic: String,
    /// Only records dead-lettered at or after this time: a duration ago (`30m`, `2h`) or an
    /// RFC 3339 time in UTC (`2026-11-25T15:40:00Z`, `2026-11-25T15:40:00.250Z`).
    #[arg(long, value_parser = parse_time, value_name = "TIME")]
    pub since: Option<TimeArg>,
    /// Only records dead-lettered at or before this time, to the millisecond (same forms as
    /// --since).
    #[arg(long, value_parser = parse_time, value_name = "TIME")]
    pub until: Option<TimeArg>,
    /// Only records whose error contains this text (case-insensitive).
    #[arg(long, value_name = "TEXT")]
    pub error_contains: Option<String>,
    /// Only records dead-lettered for this reason.
    #[arg(long, value_parser = reason_parser())]
    pub reason: Option<Reason>,
    /// Only records with exactly this key.
    #[arg(long)]
    pub key: Option<String>,
}

/// A `--since`/`--until` value as given: kept unresolved so that the same command names the
/// same selection (and progress group) whenever it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeArg {
    /// A duration before now (`1h`).
    Ago(Duration),
    /// An absolute time, ms since the epoch.
    At(i64),
}

impl TimeArg {
    /// The time meant, ms since the epoch, for a run that started at `now_ms`.
    pub fn resolve(self, now_ms: i64) -> i64 {
        match self {
            TimeArg::Ago(d) => {
                now_ms.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            }
            TimeArg::At(t) => t,
        }
    }

    /// Whether a later run of the same command means a later time.
    pub fn is_relative(self) -> bool {
        matches!(self, TimeArg::Ago(_))
    }

    /// The normalized form the default progress group is derived from.
    pub fn canonical(self) -> String {
        match self {
            TimeArg::Ago(d) => format!("ago:{}ms", d.as_millis()),
            TimeArg::At(t) => format!("at:{t}ms"),
        }
    }
}

/// A dead-letter reason, as written in `sidetrack-error-kind`: the library's own type, so the
/// CLI accepts exactly the values the runtime writes.
pub use sidetrack::Reason;

/// `--reason` values: every [`Reason`] in its wire form, with the library's description as
/// help (so `--help` and the "possible values" of an error list them).
fn reason_parser() -> impl clap::builder::TypedValueParser<Value = Reason> {
    use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser as _};
    PossibleValuesParser::new(
        Reason::ALL.map(|r| PossibleValue::new(r.as_str()).help(r.description())),
    )
    .try_map(|s| s.parse::<Reason>())
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Table,
    Json,
}

#[derive(Args, Debug)]
struct ListArgs {
    #[command(flatten)]
    filters: Filters,
    /// Show at most this many records.
    #[arg(long, value_parser = parse_limit)]
    limit: Option<usize>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
}

#[derive(Args, Debug)]
struct ShowArgs {
    /// The dead-letter topic.
    #[arg(long)]
    topic: String,
    /// The record, as PARTITION:OFFSET (as printed by `dlq list`).
    #[arg(value_parser = parse_position, value_name = "PARTITION:OFFSET")]
    position: (i32, i64),
}

#[derive(Args, Debug)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub filters: Filters,
    /// Where to: `original` (the topic the record came from), `first-retry` (its first retry
    /// tier, with a fresh envelope), or a topic name.
    #[arg(
        long,
        default_value = "original",
        value_name = "original|first-retry|TOPIC"
    )]
    pub to: String,
    /// Send at most this many records per second (`100/s` or `100`).
    #[arg(long, value_parser = parse_rate, value_name = "N/s")]
    pub rate: Option<f64>,
    /// Replay at most this many records in this run (progress then stops after the last
    /// record considered).
    #[arg(long, value_parser = parse_limit)]
    pub limit: Option<usize>,
    /// Print what would be sent; send nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Actually send. Without it, replay is a dry run.
    #[arg(long)]
    pub yes: bool,
    /// Ignore saved progress and consider every record again.
    #[arg(long)]
    pub restart: bool,
    /// Consumer group that keeps the progress (default: derived from the topic, filters and
    /// target, so the same replay run twice sends nothing new).
    #[arg(long, value_name = "GROUP")]
    pub progress_group: Option<String>,
    /// Runtime config (TOML) to find retry tier names for `--to first-retry`; without it the
    /// tier with the shortest delay among `{topic}.{group}.retry.*` is used.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct TopologyArgs {
    /// Source topic (repeatable; default: the config's topics).
    #[arg(long)]
    topic: Vec<String>,
    /// Consumer group (default: the config's group).
    #[arg(long)]
    group: Option<String>,
    /// Runtime config (TOML) with the retry policy and naming patterns.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Create missing retry and dead-letter topics (source topic's partition count).
    #[arg(long)]
    create: bool,
}

#[derive(Args, Debug)]
struct LagArgs {
    /// The runtime's consumer group (its retry consumer is `GROUP.retry`).
    #[arg(long)]
    group: String,
    /// Only this source topic (default: every topic the group has committed offsets on).
    #[arg(long)]
    topic: Option<String>,
}

/// A failure with its exit code.
#[derive(Debug)]
pub enum Failure {
    /// Bad arguments or filters (2).
    Usage(String),
    /// Brokers unreachable (3).
    Unreachable(String),
    /// Unknown topic (4).
    UnknownTopic(String),
    /// Record not found (5).
    NotFound(String),
    /// Anything else (1).
    Other(String),
}

impl Failure {
    /// The process exit code: 1 other, 2 usage, 3 unreachable, 4 unknown topic, 5 not found.
    /// Scripts (and the alert's pasted commands) branch on these: they never change meaning.
    fn code(&self) -> u8 {
        match self {
            Failure::Other(_) => 1,
            Failure::Usage(_) => 2,
            Failure::Unreachable(_) => 3,
            Failure::UnknownTopic(_) => 4,
            Failure::NotFound(_) => 5,
        }
    }
    /// The message printed after `error: ` (escaped there: it may quote broker answers).
    fn message(&self) -> &str {
        match self {
            Failure::Usage(m)
            | Failure::Unreachable(m)
            | Failure::UnknownTopic(m)
            | Failure::NotFound(m)
            | Failure::Other(m) => m,
        }
    }
}

impl From<sidetrack::Error> for Failure {
    /// Library errors by what the user can do about them: a missing topic is exit 4, a bad
    /// `--config` is a usage error (2), anything else is 1 with the library's message.
    fn from(e: sidetrack::Error) -> Self {
        match e {
            sidetrack::Error::SourceTopicMissing(t) => {
                Failure::UnknownTopic(format!("topic `{t}` does not exist"))
            }
            sidetrack::Error::Config(c) => Failure::Usage(c.to_string()),
            other => Failure::Other(other.to_string()),
        }
    }
}

/// A `humantime` duration (`30s`, `2m`, `1h 30m`) for `--timeout` and friends; the error
/// says what form is expected, since clap prints it as is.
fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("`{s}` is not a duration like 30s or 2m: {e}"))
}

/// A duration ago, or an RFC 3339 time (UTC, any fraction of a second).
fn parse_time(s: &str) -> Result<TimeArg, String> {
    if let Ok(d) = humantime::parse_duration(s) {
        if std::time::SystemTime::now().checked_sub(d).is_none() {
            return Err(format!("`{s}` is too far back"));
        }
        return Ok(TimeArg::Ago(d));
    }
    humantime::parse_rfc3339_weak(s)
        .map(|t| TimeArg::At(epoch_ms(t)))
        .map_err(|_| {
            format!(
                "`{s}` is neither a duration (30m, 2h) nor an RFC 3339 time in UTC \
                 (2026-11-25T15:40:00Z, 2026-11-25T15:40:00.250Z)"
            )
        })
}

/// `PARTITION:OFFSET` as `dlq show` takes it (what `dlq list` prints in its first column),
/// both non-negative; whitespace around either number is allowed.
fn parse_position(s: &str) -> Result<(i32, i64), String> {
    let (p, o) = s
        .split_once(':')
        .ok_or_else(|| format!("`{s}` is not PARTITION:OFFSET"))?;
    let p: i32 = p
        .trim()
        .parse()
        .map_err(|_| format!("bad partition in `{s}`"))?;
    let o: i64 = o
        .trim()
        .parse()
        .map_err(|_| format!("bad offset in `{s}`"))?;
    if p < 0 || o < 0 {
        return Err(format!("`{s}`: partition and offset must not be negative"));
    }
    Ok((p, o))
}

/// `--limit`: a positive number of records (0 would select nothing and look like an empty DLQ).
fn parse_limit(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("`{s}` is not a positive number of records")),
    }
}

/// Slowest `--rate`: one record every 1000 s. Slower rates are not useful, and the interval
/// between two records (1/rate) must fit a `Duration` (`1e-20/s` overflowed it: a panic).
const MIN_RATE: f64 = 0.001;

/// `--rate`: records per second, written `100` or `100/s`, finite and at least [`MIN_RATE`]
/// (a rate too slow is refused with the lowest one, not rounded).
fn parse_rate(s: &str) -> Result<f64, String> {
    let n = s.strip_suffix("/s").unwrap_or(s);
    match n.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r >= MIN_RATE => Ok(r),
        Ok(r) if r.is_finite() && r > 0.0 => Err(format!(
            "`{s}` is too slow: the lowest rate is {MIN_RATE}/s (one record every {} s)",
            1.0 / MIN_RATE
        )),
        _ => Err(format!("`{s}` is not a positive rate like 100/s")),
    }
}

/// Parses the command line, runs it, and turns a [`Failure`] into its message on stderr and
/// its exit code. Nothing else prints `error:`.
#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            // Messages can quote broker answers and record-derived names.
            eprintln!(
                "error: {}",
                sidetrack::escape::for_terminal(f.message(), 4096)
            );
            ExitCode::from(f.code())
        }
    }
}

/// Dispatches a parsed command line: the proxy first (it needs no `--brokers`), then the
/// broker connection is checked once ([`kafka::Kafka`]) and handed to the subcommand.
async fn run(cli: Cli) -> Result<(), Failure> {
    // The proxy needs no brokers (it starts an embedded one), so it is dispatched first.
    #[cfg(feature = "proxy")]
    let cli = match cli.command {
        Command::Proxy(args) => return proxy::run(cli.brokers, &cli.property, args).await,
        command => Cli { command, ..cli },
    };
    let brokers = cli.brokers.clone().ok_or_else(|| {
        Failure::Usage("no brokers: pass --brokers HOST:PORT or set KAFKA_BROKERS".into())
    })?;
    let kafka = kafka::Kafka::connect(&brokers, &cli.property, cli.timeout).await?;
    match cli.command {
        Command::Dlq(DlqCommand::List(a)) => {
            dlq::list(&kafka, &a.filters, a.limit, a.format == Format::Json).await
        }
        Command::Dlq(DlqCommand::Show(a)) => dlq::show(&kafka, &a.topic, a.position).await,
        Command::Dlq(DlqCommand::Replay(a)) => replay::replay(&kafka, &a).await,
        Command::Topology(a) => {
            report::topology(
                &kafka,
                &a.topic,
                a.group.as_deref(),
                a.config.as_deref(),
                a.create,
            )
            .await
        }
        Command::Lag(a) => report::lag(&kafka, &a.group, a.topic.as_deref()).await,
        #[cfg(feature = "proxy")]
        Command::Proxy(_) => Err(Failure::Other("the proxy is dispatched above".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_positive_finite_and_not_too_slow() {
        assert_eq!(parse_rate("100/s"), Ok(100.0));
        assert_eq!(parse_rate("0.5"), Ok(0.5));
        assert_eq!(parse_rate("0.001/s"), Ok(0.001));
        assert!(parse_rate("1e300/s").is_ok());
        for bad in [
            "0", "-1/s", "NaN", "inf/s", "1e-20/s", "0.0009/s", "5e-324", "fast",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        assert!(parse_rate("1e-20/s").unwrap_err().contains("too slow"));
        // Every accepted rate has an interval a Duration holds.
        for ok in ["0.001", "1", "1e300"] {
            let r = parse_rate(ok).unwrap();
            assert!(Duration::try_from_secs_f64(1.0 / r).is_ok());
        }
    }

    #[test]
    fn times_parse_unresolved_and_to_the_millisecond() {
        assert_eq!(
            parse_time("1h"),
            Ok(TimeArg::Ago(Duration::from_secs(3600)))
        );
        assert_eq!(
            parse_time("2023-11-14T22:13:00Z"),
            Ok(TimeArg::At(1_699_999_980_000))
        );
        // What alerts write: milliseconds, inclusive ends.
        assert_eq!(
            parse_time("2023-11-14T22:13:59.999Z"),
            Ok(TimeArg::At(1_700_000_039_999))
        );
        assert!(parse_time("yesterday-ish").is_err());
        assert!(parse_time("1969-12-31T23:59:59Z").is_err());
        // Further back than 1970 is fine: it means "everything".
        let ages = parse_time("100000000000y").unwrap();
        assert!(ages.resolve(1_700_000_000_000) < 0);
        let t = TimeArg::Ago(Duration::from_secs(60));
        assert_eq!(t.resolve(100_000), 40_000);
        assert_eq!(TimeArg::Ago(Duration::MAX).resolve(0), -i64::MAX);
        assert_eq!(TimeArg::Ago(Duration::MAX).resolve(i64::MIN), i64::MIN);
        assert_eq!(TimeArg::At(5).resolve(i64::MAX), 5);
    }
}

//! The consumer runtime's spans (feature `otel`): a `process` span per handler call and a
//! `send` span per hand-off to a retry tier or the DLQ.
//!
//! A stage of its own so that the partition task and the hand-off only call two or three
//! functions under `#[cfg(feature = "otel")]`, and the rules live in one place:
//!
//! - **process** (`process {topic}`, kind consumer): a new trace that **links** to the context
//!   in the record's `traceparent` (the conventions' default), or, with
//!   `process_parent = "child"`, its child. It also links to the record's **origin** (the
//!   producer's span, kept in `sidetrack-origin-traceparent` across hand-offs) when that is not
//!   the record's own context, so every attempt points back to the request that produced it.
//!   The handler's own spans nest inside it.
//! - **send** (`send {target}`, kind producer): the hand-off, child of the `process` span of the
//!   attempt that failed. The record written gets this span's `traceparent`, **replacing** the
//!   one it had (never stacked), and keeps its origin's context in its own header.
//!
//! Attributes follow the messaging conventions (`messaging.*`, `messaging.kafka.*`), plus
//! `sidetrack.attempt`, `sidetrack.ordering` and `sidetrack.outcome`; all but the outcome are
//! set when the span starts, so a sampler can read them.
//!
//! **Sampling happens here, before any span exists** ([`ProcessTracing::sampled_span`]). A
//! `tracing` span costs its registry slot, its fields, the OpenTelemetry layer's span builder
//! (every attribute a `KeyValue`, the name a `String`) and the log layer's formatting of its
//! fields — all paid *before* the SDK's sampler runs, and paid again for a span the sampler
//! then drops. Measured, that made an unsampled record cost ~10x a record without the feature.
//! So the runtime decides itself, with the SDK's `ParentBased(TraceIdRatioBased)` rule: a
//! record whose `traceparent` has a sampled flag follows it (sampled or not, in `link` and
//! `child` mode alike), any other record is drawn at the configured ratio. Only a sampled record
//! gets a `process` span, and only its hand-off a `send` span and restamped headers; the span
//! then carries a [`Presampled`] mark that the provider's
//! [`RuntimeSampler`](super::export::RuntimeSampler) honours, so the SDK does not draw again.
//! An unsampled record costs one header scan and one random draw; its headers travel on
//! unchanged (its own `traceparent`, flag and all, and its origin headers if it had them).

use std::sync::Arc;

/// Most characters of a record key recorded on the `process` span (opt-in
/// `record_key`); a longer key is cut with `…[N more bytes]`.
const KEY_MAX_CHARS: usize = 256;

use opentelemetry::trace::TraceContextExt as _;
use tracing::field::Empty;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::handler::{Header, Message};
use crate::outcome::Disposition;

use super::carrier::{self, RecordContext};
use super::config::{ProcessParent, Sampling, TracingConfig};
use super::export::Presampled;
use super::span;

/// What the runtime's spans need from the configuration, read once per runtime.
#[derive(Debug, Clone)]
pub struct ProcessTracing {
    group: Arc<str>,
    ordering: &'static str,
    parent: ProcessParent,
    record_key: bool,
    /// The sampler the exporter was built with (ratio and parent-based), resolved once.
    sampling: Sampling,
}

impl ProcessTracing {
    /// The runtime's span settings for consumer group `group`, records ordered by `ordering`
    /// (`partition`, `key` or `unordered`); `None` when `[tracing]` is absent or disabled.
    pub fn new(
        tracing: Option<&TracingConfig>,
        group: &str,
        ordering: &'static str,
    ) -> Option<Arc<Self>> {
        let cfg = tracing?;
        if cfg.enabled == Some(false) {
            return None;
        }
        // The same resolution as the exporter's (file, then `OTEL_TRACES_SAMPLER*`). An
        // invalid environment already failed the exporter's start; sampling everything here
        // then leaves the decision to whatever sampler the subscriber has.
        let sampling = cfg.resolve(group).map_or(
            Sampling {
                ratio: 1.0,
                parent_based: true,
            },
            |r| r.sampling,
        );
        Some(Arc::new(ProcessTracing {
            group: Arc::from(group),
            ordering,
            parent: cfg.process_parent,
            record_key: cfg.record_key,
            sampling,
        }))
    }

    /// The `process` span of one handler call on `msg` **if the record is sampled**, `None`
    /// otherwise (then no span, no hand-off span and no header rewrite for this attempt).
    ///
    /// The decision follows `ParentBased(TraceIdRatioBased)`: with a parent-based sampler
    /// (the default) a record carrying a valid `traceparent` is traced exactly when its sampled
    /// flag is set — the producer's decision is kept through every retry tier, whose records
    /// carry the hand-off's `traceparent` (sampled). Any other record (no or an invalid
    /// context, or a root-only sampler) is drawn at the ratio. Costs a scan of the headers
    /// (none for a record without headers) and one draw from a thread-local generator.
    pub fn sampled_span(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        msg: &Message,
    ) -> Option<Span> {
        let headers = msg.headers();
        let own = if headers.is_empty() {
            None
        } else {
            carrier::extract(headers)
        };
        let sampled = match (&own, self.sampling.parent_based) {
            (Some(cx), true) => cx.parent.flags.sampled(),
            _ => draw(self.sampling.ratio),
        };
        sampled.then(|| self.span_for(topic, partition, offset, msg, own))
    }

    /// The `process` span of one handler call on `msg`, consumed from `topic`/`partition` at
    /// `offset`, whatever the sampling (the runtime calls [`sampled_span`](Self::sampled_span)).
    /// Remembers the span's context in the message for its hand-off. Reads the record's
    /// headers (a record on a source topic has them decoded here, once).
    pub fn process_span(&self, topic: &str, partition: i32, offset: i64, msg: &Message) -> Span {
        self.span_for(
            topic,
            partition,
            offset,
            msg,
            carrier::extract(msg.headers()),
        )
    }

    /// The span of a record decided sampled, `own` its context already read from its headers.
    fn span_for(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        msg: &Message,
        own: Option<RecordContext>,
    ) -> Span {
        let name = format!("process {topic}");
        let span = tracing::info_span!(
            parent: None,
            "process",
            otel.name = name.as_str(),
            otel.kind = "consumer",
            messaging.system = "kafka",
            messaging.operation.type = "process",
            messaging.operation.name = "process",
            messaging.destination.name = topic,
            messaging.destination.partition.id = partition.to_string().as_str(),
            messaging.kafka.offset = offset,
            messaging.consumer.group.name = &*self.group,
            messaging.kafka.message.key = Empty,
            messaging.kafka.message.tombstone = Empty,
            messaging.message.body.size = msg.payload().map_or(0, <[u8]>::len) as i64,
            sidetrack.attempt = i64::from(msg.attempt()),
            sidetrack.ordering = self.ordering,
            sidetrack.outcome = Empty,
            error.type = Empty,
            trace_id = Empty,
            span_id = Empty,
        );
        if self.record_key {
            if let Some(key) = msg.key().and_then(|k| std::str::from_utf8(k).ok()) {
                // Span fields reach the log formatter too: escaped and bounded by the project's
                // one rule for bytes shown to people (control/bidi characters never printed raw).
                let key = crate::escape::for_terminal(key, KEY_MAX_CHARS);
                span.record("messaging.kafka.message.key", key.as_str());
            }
        }
        if msg.payload().is_none() {
            span.record("messaging.kafka.message.tombstone", true);
        }
        let origin = carrier::extract_origin(msg.headers());
        // The decision is made: the mark tells the provider's sampler not to draw again (which
        // for a new trace would sample ratio² of the records).
        let parent = match (&own, self.parent) {
            (Some(cx), ProcessParent::Child) => opentelemetry::Context::new()
                .with_remote_span_context(cx.to_span_context())
                .with_value(Presampled),
            _ => opentelemetry::Context::new().with_value(Presampled),
        };
        let _ = span.set_parent(parent);
        if let Some(cx) = &own {
            match self.parent {
                ProcessParent::Child => span::link_as(&span, cx, "parent"),
                ProcessParent::Link => span::link_as(&span, cx, "producer"),
            }
        }
        if let Some(origin) = origin.filter(|o| own.as_ref().is_none_or(|c| c.parent != o.parent)) {
            span::link_as(&span, &origin, "origin");
        }
        span::record_ids(&span);
        if let Some(cx) = span::context_of(&span) {
            msg.set_trace(cx.to_span_context());
        }
        span
    }
}

/// True with probability `ratio`: the root sampler's draw for a record without a (usable)
/// caller. A thread-local splitmix64, seeded per thread from the std's random hasher keys:
/// no lock, no allocation, and statistically independent of the trace ids the SDK generates.
fn draw(ratio: f64) -> bool {
    use std::cell::Cell;
    use std::hash::{BuildHasher as _, Hasher as _};
    if ratio >= 1.0 {
        return true;
    }
    if ratio <= 0.0 || ratio.is_nan() {
        return false;
    }
    thread_local! {
        static STATE: Cell<u64> = Cell::new(
            std::collections::hash_map::RandomState::new().build_hasher().finish() | 1,
        );
    }
    let x = STATE.with(|s| {
        let next = s.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        s.set(next);
        let mut z = next;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    });
    // 53 random bits as a float in [0, 1).
    ((x >> 11) as f64) * (1.0 / (1u64 << 53) as f64) < ratio
}

/// Records how the call ended on its `process` span: `success`, `retry` or `dead_letter`, and
/// for a failure `error.type` (`retryable`, or the dead-letter reason) and an error status.
/// A span without the `sidetrack.outcome` field (any other span) is left alone.
pub fn record_outcome(span: &Span, outcome: Option<Disposition>) {
    if span.field("sidetrack.outcome").is_none() {
        return;
    }
    match outcome {
        None => {
            span.record("sidetrack.outcome", "success");
        }
        Some(Disposition::Retry { .. }) => {
            span.record("sidetrack.outcome", "retry");
            span::set_error(span, "retryable");
        }
        Some(Disposition::DeadLetter(reason)) => {
            span.record("sidetrack.outcome", "dead_letter");
            span::set_error(span, reason.as_str());
        }
    }
}

/// The `send {target}` span of a hand-off of `msg` (kind producer), child of the record's
/// `process` span, with the destination and the hop (`sidetrack.hop`: `retry` with the tier,
/// or `dead_letter` with the reason).
pub fn hand_off_span(msg: &Message, target: &str, decision: Disposition) -> Span {
    let name = format!("send {target}");
    let (hop, tier, reason) = match decision {
        Disposition::Retry { tier, .. } => ("retry", Some(tier as i64), None),
        Disposition::DeadLetter(r) => ("dead_letter", None, Some(r.as_str())),
    };
    let span = tracing::info_span!(
        parent: None,
        "send",
        otel.name = name.as_str(),
        otel.kind = "producer",
        messaging.system = "kafka",
        messaging.operation.type = "send",
        messaging.operation.name = "send",
        messaging.destination.name = target,
        messaging.destination.partition.id = Empty,
        messaging.kafka.offset = Empty,
        sidetrack.hop = hop,
        sidetrack.retry.tier = tier,
        sidetrack.dead_letter.reason = reason,
        sidetrack.attempt = i64::from(msg.attempt()),
        trace_id = Empty,
        span_id = Empty,
    );
    if let Some(parent) = msg.trace() {
        let _ =
            span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent.clone()));
    }
    span::record_ids(&span);
    span
}

/// The headers of the record a hand-off writes: the user's headers with the origin's context
/// kept (copied from the record's `traceparent` on its first hand-off) and the record's
/// `traceparent` **replaced** by the hand-off span's. Unchanged when the span has no context.
pub fn stamp(user_headers: &[Header], hand_off: &Span) -> Vec<Header> {
    let mut headers = user_headers.to_vec();
    if let Some(cx) = span::context_of(hand_off) {
        carrier::keep_origin(&mut headers);
        carrier::inject(&mut headers, &cx.parent, &cx.state);
    }
    headers
}

/// Records where the broker put the handed-off record.
pub fn record_delivery(span: &Span, partition: i32, offset: i64) {
    span.record(
        "messaging.destination.partition.id",
        partition.to_string().as_str(),
    );
    if offset >= 0 {
        span.record("messaging.kafka.offset", offset);
    }
}

/// The record context of the hand-off `span`, for tests and logs.
pub fn context(span: &Span) -> Option<RecordContext> {
    span::context_of(span)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::Reason;
    use crate::telemetry::memory::{attribute, MemoryTracing};
    use opentelemetry::trace::SpanKind;

    const PRODUCER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn tracing_cfg(parent: ProcessParent) -> Arc<ProcessTracing> {
        let cfg = TracingConfig {
            process_parent: parent,
            record_key: true,
            ..TracingConfig::default()
        };
        ProcessTracing::new(Some(&cfg), "billing", "partition").unwrap()
    }

    /// Link mode: the `process` span is a new trace linked to the producer, with the
    /// conventions' attributes and the outcome; its hand-off is its child and the record
    /// written carries the hand-off's `traceparent` and the origin.
    #[test]
    fn process_links_to_the_producer_and_hand_off_replaces_the_traceparent() {
        let t = MemoryTracing::install();
        let msg = Message::new("orders", b"{}".to_vec())
            .with_key("customer-7")
            .with_header("traceparent", PRODUCER)
            .with_header("x", "y");
        let pt = tracing_cfg(ProcessParent::Link);
        let process = pt.process_span("orders", 0, 42, &msg);
        process.in_scope(|| tracing::info_span!("handler work").in_scope(|| {}));
        record_outcome(
            &process,
            Some(Disposition::Retry {
                tier: 0,
                delay: std::time::Duration::from_secs(1),
            }),
        );
        let decision = Disposition::Retry {
            tier: 0,
            delay: std::time::Duration::from_secs(1),
        };
        let send = hand_off_span(&msg, "orders.billing.retry-1", decision);
        let headers = stamp(msg.headers(), &send);
        record_delivery(&send, 0, 7);
        drop(send);
        drop(process);

        let p = &t.named("process orders")[0];
        assert_eq!(p.span_kind, SpanKind::Consumer);
        assert_eq!(
            p.parent_span_id,
            opentelemetry::trace::SpanId::INVALID,
            "a new trace"
        );
        assert_eq!(
            p.links.links[0].span_context.span_id().to_string(),
            "00f067aa0ba902b7"
        );
        let attr = |k| attribute(p, k).map(|v| v.as_str().into_owned());
        assert_eq!(
            attr("messaging.destination.partition.id").as_deref(),
            Some("0")
        );
        assert_eq!(
            attr("messaging.kafka.message.key").as_deref(),
            Some("customer-7")
        );
        assert_eq!(
            attr("messaging.consumer.group.name").as_deref(),
            Some("billing")
        );
        assert_eq!(attr("sidetrack.outcome").as_deref(), Some("retry"));
        assert_eq!(attr("error.type").as_deref(), Some("retryable"));
        let work = &t.named("handler work")[0];
        assert_eq!(work.parent_span_id, p.span_context.span_id());

        let s = &t.named("send orders.billing.retry-1")[0];
        assert_eq!(s.span_kind, SpanKind::Producer);
        assert_eq!(s.parent_span_id, p.span_context.span_id());
        // One traceparent, the hand-off's; the origin kept beside it; other headers as they were.
        let parents: Vec<_> = headers.iter().filter(|h| h.is("traceparent")).collect();
        assert_eq!(parents.len(), 1);
        assert_eq!(
            carrier::extract(&headers).unwrap().parent.parent_id.0,
            s.span_context.span_id().to_bytes()
        );
        assert_eq!(
            carrier::extract_origin(&headers)
                .unwrap()
                .parent
                .to_string(),
            PRODUCER
        );
        assert!(headers.contains(&Header::new("x", "y")));
    }

    /// Child mode on a retried record: child of the hand-off that wrote it, linked to it and
    /// to the origin.
    #[test]
    fn child_mode_continues_the_trace_and_retries_link_to_the_origin() {
        let t = MemoryTracing::install();
        let hand_off = "00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01";
        // A record on a retry tier: its traceparent is the hand-off's, its origin the producer's.
        let msg = Message::new("orders.billing.retry-1", b"{}".to_vec())
            .with_header("traceparent", hand_off)
            .with_header(carrier::ORIGIN_TRACEPARENT, PRODUCER);
        let pt = tracing_cfg(ProcessParent::Child);
        let process = pt.process_span("orders.billing.retry-1", 0, 3, &msg);
        record_outcome(&process, Some(Disposition::DeadLetter(Reason::Exhausted)));
        drop(process);
        let p = &t.named("process orders.billing.retry-1")[0];
        assert_eq!(
            p.span_context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(p.parent_span_id.to_string(), "1111111111111111");
        let linked: Vec<String> = p
            .links
            .links
            .iter()
            .map(|l| l.span_context.span_id().to_string())
            .collect();
        assert_eq!(linked, ["1111111111111111", "00f067aa0ba902b7"]);
        assert_eq!(
            attribute(p, "error.type")
                .map(|v| v.as_str().into_owned())
                .as_deref(),
            Some("exhausted")
        );
    }

    /// Sampling is decided before any span: ratio 0 makes none for a record without context,
    /// a record whose `traceparent` is sampled is traced anyway (parent-based), one whose
    /// `traceparent` is not sampled is not traced even at ratio 1; unsampled records leave
    /// no context for a hand-off (which then writes their headers as they are).
    #[test]
    fn sampling_is_decided_before_the_span_and_follows_the_parent() {
        let _t = MemoryTracing::install();
        let with_ratio = |ratio| {
            let cfg = TracingConfig {
                sampling_ratio: Some(ratio),
                ..TracingConfig::default()
            };
            ProcessTracing::new(Some(&cfg), "billing", "partition").unwrap()
        };
        let none = with_ratio(0.0);
        let plain = Message::new("orders", b"{}".to_vec());
        assert!(none.sampled_span("orders", 0, 1, &plain).is_none());
        assert!(plain.trace().is_none(), "no context for a hand-off");
        let sampled = Message::new("orders", b"{}".to_vec()).with_header("traceparent", PRODUCER);
        assert!(none.sampled_span("orders", 0, 1, &sampled).is_some());
        let unsampled = Message::new("orders", b"{}".to_vec()).with_header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        );
        assert!(with_ratio(1.0)
            .sampled_span("orders", 0, 1, &unsampled)
            .is_none());
        assert!(with_ratio(1.0)
            .sampled_span("orders", 0, 1, &plain)
            .is_some());
        // The draw is near the ratio.
        let hits = (0..20_000).filter(|_| draw(0.1)).count();
        assert!((1_600..2_400).contains(&hits), "{hits} of 20000 at 10 %");
    }

    /// The provider's sampler records a span sidetrack decided, even at ratio 0, and asks its
    /// inner sampler otherwise.
    #[test]
    fn runtime_sampler_honours_the_presampled_mark() {
        use crate::telemetry::export::RuntimeSampler;
        use opentelemetry_sdk::trace::{Sampler, SamplingDecision, ShouldSample};
        let s = RuntimeSampler::new(Sampler::ParentBased(Box::new(Sampler::AlwaysOff)));
        let id = opentelemetry::trace::TraceId::from(7u128);
        let kind = opentelemetry::trace::SpanKind::Consumer;
        let marked = opentelemetry::Context::new().with_value(Presampled);
        let decide = |cx: &opentelemetry::Context| {
            s.should_sample(Some(cx), id, "process orders", &kind, &[], &[])
                .decision
        };
        assert_eq!(decide(&marked), SamplingDecision::RecordAndSample);
        assert_eq!(
            decide(&opentelemetry::Context::new()),
            SamplingDecision::Drop
        );
    }

    /// No context: no link; no subscriber: the user's headers are written as they are.
    #[test]
    fn no_context_means_no_links_and_untouched_headers() {
        let t = MemoryTracing::install();
        let msg = Message::new("orders", b"{}".to_vec());
        let process = tracing_cfg(ProcessParent::Link).process_span("orders", 0, 1, &msg);
        drop(process);
        assert!(t.named("process orders")[0].links.links.is_empty());
        // Without a subscriber (tracing off), a hand-off writes the user's headers as they are.
        let plain = Message::new("orders", b"{}".to_vec()).with_header("traceparent", PRODUCER);
        let off = tracing::Span::none();
        assert_eq!(stamp(plain.headers(), &off), plain.headers().to_vec());
    }
}

//! Trace context in Kafka record headers: read it, write it, and keep the origin's.
//!
//! This stage is separate from [`w3c`](super::w3c) (which only knows bytes) because it knows
//! the rules of a *record*: which headers carry the context, what to do when a record carries
//! several, and that writing a context **replaces** the one there instead of appending another
//! `traceparent` (Spring Kafka stacked one per retry hop, spring-kafka #3816, so every consumer
//! read a different parent depending on which header it picked). It is compiled without the
//! `otel` feature too: the dead-letter tools print a record's origin trace id from these headers
//! whatever the build. With `otel`, [`HeaderInjector`] and [`HeaderExtractor`] adapt the same
//! rules to OpenTelemetry's propagator traits.
//!
//! Header names are compared ignoring ASCII case, as HTTP compares them: a context that reached
//! Kafka through an HTTP bridge may have kept a `TraceParent` spelling. Several `traceparent`
//! headers with one value count as one; with different values the record's context is invalid
//! and a new trace starts (the W3C rule for a repeated `traceparent`), because picking one
//! would link the record to a producer at random.

use crate::handler::Header;

use super::w3c::{TraceParent, TraceParentError, TraceState, TRACESTATE_COPY_MAX};

/// Name of the W3C parent header, as the Java, Go and Python instrumentations write it.
pub const TRACEPARENT: &str = "traceparent";
/// Name of the W3C vendor-state header.
pub const TRACESTATE: &str = "tracestate";
/// Envelope header keeping the `traceparent` of the record as first produced, so that every
/// retry attempt and the dead letter link back to the producer's span although each hand-off
/// gives the record a fresh `traceparent` of its own.
pub const ORIGIN_TRACEPARENT: &str = "sidetrack-origin-traceparent";
/// Envelope header keeping the origin's `tracestate`, written only when it was non-empty.
pub const ORIGIN_TRACESTATE: &str = "sidetrack-origin-tracestate";

/// The trace context a record (or request) carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordContext {
    /// The producer's span, as its `traceparent`.
    pub parent: TraceParent,
    /// Its `tracestate`; empty when absent or invalid (an invalid one is dropped whole).
    pub state: TraceState,
}

/// Why a record's trace context was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CarrierError {
    /// The `traceparent` value is malformed.
    #[error("invalid traceparent: {0}")]
    TraceParent(#[from] TraceParentError),
    /// Several `traceparent` headers with different values.
    #[error("{0} traceparent headers with different values")]
    Conflicting(usize),
    /// A `traceparent` header with a null value.
    #[error("traceparent header with a null value")]
    Null,
}

/// True if `header` is named `name`, ignoring ASCII case.
fn named(header: &Header, name: &str) -> bool {
    header.key.eq_ignore_ascii_case(name.as_bytes())
}

/// The context from the values of every `traceparent` header (`parents`) and every
/// `tracestate` header (`states`) of one request or record, by this module's rules. The HTTP
/// proxy passes its request's header values; records go through [`try_extract`].
///
/// # Errors
/// [`CarrierError`] when a `traceparent` is present but unusable; `Ok(None)` when absent.
pub fn extract_values<'a>(
    mut parents: impl Iterator<Item = Option<&'a [u8]>>,
    states: impl Iterator<Item = Option<&'a [u8]>>,
) -> Result<Option<RecordContext>, CarrierError> {
    let Some(first) = parents.next() else {
        return Ok(None);
    };
    let value = first.ok_or(CarrierError::Null)?;
    let mut count = 1;
    for other in parents {
        count += 1;
        if other != Some(value) {
            return Err(CarrierError::Conflicting(count));
        }
    }
    let parent = TraceParent::parse(value)?;
    let state = TraceState::parse_all(states.flatten()).unwrap_or_default();
    Ok(Some(RecordContext { parent, state }))
}

/// Reads the context stored under the header names `parent_name` / `state_name`.
///
/// # Errors
/// [`CarrierError`] when a `traceparent` is present but unusable.
pub fn try_extract_named(
    headers: &[Header],
    parent_name: &str,
    state_name: &str,
) -> Result<Option<RecordContext>, CarrierError> {
    extract_values(
        headers
            .iter()
            .filter(|h| named(h, parent_name))
            .map(|h| h.value.as_deref()),
        headers
            .iter()
            .filter(|h| named(h, state_name))
            .map(|h| h.value.as_deref()),
    )
}

/// The context in the record's `traceparent`/`tracestate` headers.
///
/// # Errors
/// [`CarrierError`] when a `traceparent` is present but unusable; `Ok(None)` when absent.
pub fn try_extract(headers: &[Header]) -> Result<Option<RecordContext>, CarrierError> {
    try_extract_named(headers, TRACEPARENT, TRACESTATE)
}

/// The context in the record's `traceparent`/`tracestate` headers; `None` when absent or
/// invalid (a new trace starts then).
pub fn extract(headers: &[Header]) -> Option<RecordContext> {
    try_extract(headers).ok().flatten()
}

/// The context the record had when first produced: the envelope's origin headers once the
/// record has been handed off, else its own `traceparent` (a record on its first attempt is
/// its own origin).
pub fn extract_origin(headers: &[Header]) -> Option<RecordContext> {
    match try_extract_named(headers, ORIGIN_TRACEPARENT, ORIGIN_TRACESTATE) {
        Ok(Some(origin)) => Some(origin),
        // A corrupt origin header is not replaced by the current context: that one belongs to
        // the last hand-off, not to the producer.
        Err(_) => None,
        Ok(None) => extract(headers),
    }
}

/// True for the headers that carry trace context: `traceparent`, `tracestate` and the origin
/// headers (any case).
pub fn is_trace_header(header: &Header) -> bool {
    [
        TRACEPARENT,
        TRACESTATE,
        ORIGIN_TRACEPARENT,
        ORIGIN_TRACESTATE,
    ]
    .iter()
    .any(|n| named(header, n))
}

/// Removes every header named `name` (any case) and appends `value` under it.
fn replace(headers: &mut Vec<Header>, name: &str, value: Option<&[u8]>) {
    headers.retain(|h| !named(h, name));
    if let Some(value) = value {
        headers.push(Header::new(name, value));
    }
}

/// Writes `parent` and `state` as the record's context, **replacing** any `traceparent` and
/// `tracestate` it had: a record carries exactly one context, that of the span that wrote it.
/// An empty `state` removes the `tracestate` header. The state is cut to
/// [`TRACESTATE_COPY_MAX`] bytes ([`TraceState::truncated`]), so what this adds to a record
/// is bounded (about 600 bytes) whatever the caller's context carried.
pub fn inject(headers: &mut Vec<Header>, parent: &TraceParent, state: &TraceState) {
    replace(headers, TRACEPARENT, Some(&parent.to_bytes()));
    let state = (!state.is_empty()).then(|| state.truncated(TRACESTATE_COPY_MAX).header_value());
    replace(
        headers,
        TRACESTATE,
        state
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(str::as_bytes),
    );
}

/// [`inject`] unless the record already has a `traceparent`: the proxy keeps a context the
/// client put in the record's own headers, as the messaging conventions require ("a context
/// the user put in the message is not modified"). Returns whether it wrote one.
pub fn inject_if_absent(
    headers: &mut Vec<Header>,
    parent: &TraceParent,
    state: &TraceState,
) -> bool {
    if headers.iter().any(|h| named(h, TRACEPARENT)) {
        return false;
    }
    inject(headers, parent, state);
    true
}

/// Records the origin context in the origin headers, rebuilt from parsed values only. Called
/// at every hand-off, before the record's own context is replaced.
///
/// - A valid origin already recorded (a later hop) is kept, re-written canonically.
/// - Otherwise the record's own context is the origin, if [`try_extract`] accepts it: a
///   malformed `traceparent`, or several conflicting ones, give no origin (the same answer
///   [`extract`] gives, so a record reports the same origin whatever its path).
/// - Any origin header that does not parse (for example one a producer wrote itself) is
///   removed, never copied.
///
/// What is written is the 55-byte canonical `traceparent` and a `tracestate` cut to
/// [`TRACESTATE_COPY_MAX`] bytes, so the origin headers stay small whatever the record
/// carried: the oversized fallbacks of a hand-off keep them and must still fit.
pub fn keep_origin(headers: &mut Vec<Header>) {
    let origin = match try_extract_named(headers, ORIGIN_TRACEPARENT, ORIGIN_TRACESTATE) {
        Ok(Some(origin)) => Some(origin),
        Ok(None) | Err(_) => try_extract(headers).ok().flatten(),
    };
    replace(headers, ORIGIN_TRACEPARENT, None);
    replace(headers, ORIGIN_TRACESTATE, None);
    let Some(origin) = origin else {
        return;
    };
    headers.push(Header::new(ORIGIN_TRACEPARENT, origin.parent.to_bytes()));
    let state = origin.state.truncated(TRACESTATE_COPY_MAX);
    if !state.is_empty() {
        headers.push(Header::new(ORIGIN_TRACESTATE, state.header_value()));
    }
}

/// The record's trace context headers rebuilt from parsed values only: its `traceparent`
/// (canonical 55 bytes) and `tracestate` (cut to [`TRACESTATE_COPY_MAX`]) if [`extract`]
/// accepts them, and the origin pair if it parses. Never more than about 1.2 KB in all,
/// whatever the record carried: what the oversized fallbacks of a hand-off keep.
pub fn rebuilt_trace_headers(headers: &[Header]) -> Vec<Header> {
    let mut out = Vec::new();
    if let Some(cx) = extract(headers) {
        inject(&mut out, &cx.parent, &cx.state);
    }
    if let Ok(Some(origin)) = try_extract_named(headers, ORIGIN_TRACEPARENT, ORIGIN_TRACESTATE) {
        out.push(Header::new(ORIGIN_TRACEPARENT, origin.parent.to_bytes()));
        let state = origin.state.truncated(TRACESTATE_COPY_MAX);
        if !state.is_empty() {
            out.push(Header::new(ORIGIN_TRACESTATE, state.header_value()));
        }
    }
    out
}

/// The trace id of the record's origin as lowercase hex, for the dead-letter alert and
/// `sidetrack dlq show` ("open this trace").
pub fn origin_trace_id(headers: &[Header]) -> Option<String> {
    extract_origin(headers).map(|cx| cx.parent.trace_id.to_hex())
}

#[cfg(feature = "otel")]
mod otel {
    use opentelemetry::propagation::{Extractor, Injector};
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    use super::*;

    /// OpenTelemetry [`Injector`] over a record's headers: `set` replaces every header of that
    /// name (any case) instead of adding another, so a propagator cannot stack `traceparent`s.
    #[derive(Debug)]
    pub struct HeaderInjector<'a>(pub &'a mut Vec<Header>);

    impl Injector for HeaderInjector<'_> {
        fn set(&mut self, key: &str, value: String) {
            replace(self.0, key, Some(value.as_bytes()));
        }
    }

    /// OpenTelemetry [`Extractor`] over a record's headers. `get` answers the first header of
    /// that name whose value is UTF-8; [`span_context`] applies this module's stricter rules
    /// (conflicting duplicates) and is what sidetrack itself uses.
    #[derive(Debug, Clone, Copy)]
    pub struct HeaderExtractor<'a>(pub &'a [Header]);

    impl Extractor for HeaderExtractor<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0
                .iter()
                .filter(|h| named(h, key))
                .find_map(|h| std::str::from_utf8(h.value.as_deref()?).ok())
        }

        fn keys(&self) -> Vec<&str> {
            self.0.iter().filter_map(|h| h.key_str()).collect()
        }
    }

    impl RecordContext {
        /// This context as a remote OpenTelemetry span context (to parent or link to).
        pub fn to_span_context(&self) -> SpanContext {
            // Members were validated by our parser; the SDK's own check agrees on the grammar.
            let state = TraceState::from_key_value(self.state.iter()).unwrap_or_default();
            SpanContext::new(
                TraceId::from_bytes(self.parent.trace_id.0),
                SpanId::from_bytes(self.parent.parent_id.0),
                TraceFlags::new(self.parent.flags.0),
                true,
                state,
            )
        }

        /// The `traceparent`/`tracestate` of an OpenTelemetry span context; `None` if invalid.
        pub fn from_span_context(cx: &SpanContext) -> Option<Self> {
            if !cx.is_valid() {
                return None;
            }
            let parent = super::super::w3c::TraceParent::new(
                super::super::w3c::TraceId(cx.trace_id().to_bytes()),
                super::super::w3c::SpanId(cx.span_id().to_bytes()),
                super::super::w3c::TraceFlags(cx.trace_flags().to_u8()),
            );
            let state = super::super::w3c::TraceState::parse(cx.trace_state().header().as_bytes())
                .unwrap_or_default();
            Some(RecordContext { parent, state })
        }
    }

    /// The record's context as a remote span context; `None` when absent or invalid.
    pub fn span_context(headers: &[Header]) -> Option<SpanContext> {
        extract(headers).map(|cx| cx.to_span_context())
    }

    /// The origin's context (see [`extract_origin`]) as a remote span context.
    pub fn origin_span_context(headers: &[Header]) -> Option<SpanContext> {
        extract_origin(headers).map(|cx| cx.to_span_context())
    }

    /// Writes `cx` as the record's context, replacing any it had; nothing for an invalid one.
    pub fn inject_span_context(headers: &mut Vec<Header>, cx: &SpanContext) {
        if let Some(rc) = RecordContext::from_span_context(cx) {
            inject(headers, &rc.parent, &rc.state);
        }
    }
}

#[cfg(feature = "otel")]
pub use otel::{
    inject_span_context, origin_span_context, span_context, HeaderExtractor, HeaderInjector,
};

#[cfg(test)]
mod tests {
    use super::*;

    const JAVA: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const OTHER: &str = "00-12345678901234567890123456789012-1234567890123456-01";

    fn h(k: &str, v: &str) -> Header {
        Header::new(k, v)
    }

    /// The headers the OpenTelemetry Java agent writes on a record are read as they are.
    #[test]
    fn reads_the_context_a_java_client_wrote() {
        let headers = vec![
            h("content-type", "json"),
            h(TRACEPARENT, JAVA),
            h(TRACESTATE, "rojo=00f067aa0ba902b7"),
        ];
        let cx = extract(&headers).unwrap();
        assert_eq!(
            cx.parent.trace_id.to_hex(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(cx.parent.parent_id.to_hex(), "00f067aa0ba902b7");
        assert_eq!(cx.state.get("rojo"), Some("00f067aa0ba902b7"));
    }

    /// Repeated `traceparent` headers: one value is one context; differing values, a null one,
    /// or a `tracestate` alone give no context (a new trace starts).
    #[test]
    fn duplicates_agree_or_the_trace_restarts() {
        let same = vec![h(TRACEPARENT, JAVA), h("TraceParent", JAVA)];
        assert!(extract(&same).is_some());
        let stacked = vec![h(TRACEPARENT, JAVA), h(TRACEPARENT, OTHER)];
        assert_eq!(try_extract(&stacked), Err(CarrierError::Conflicting(2)));
        assert_eq!(extract(&stacked), None);
        assert_eq!(
            try_extract(&[Header::null(TRACEPARENT)]),
            Err(CarrierError::Null)
        );
        assert_eq!(
            extract(&[h(TRACESTATE, "a=1")]),
            None,
            "tracestate alone is dropped"
        );
    }

    /// A bad `tracestate` is not propagated, but the `traceparent` still is.
    #[test]
    fn an_invalid_tracestate_is_dropped_but_the_trace_continues() {
        let headers = vec![h(TRACEPARENT, JAVA), h(TRACESTATE, "foo=1,foo=2")];
        let cx = extract(&headers).unwrap();
        assert!(cx.state.is_empty());
    }

    /// Injecting again and again leaves exactly one `traceparent` (any old spelling removed)
    /// and the other headers untouched.
    #[test]
    fn inject_replaces_never_stacks() {
        let mut headers = vec![
            h(TRACEPARENT, JAVA),
            h("TRACEPARENT", OTHER),
            h(TRACESTATE, "a=1"),
            h("k", "v"),
        ];
        let new = TraceParent::parse(OTHER.as_bytes()).unwrap();
        for _ in 0..3 {
            inject(&mut headers, &new, &TraceState::default());
        }
        let parents: Vec<_> = headers.iter().filter(|x| named(x, TRACEPARENT)).collect();
        assert_eq!(parents.len(), 1);
        assert_eq!(parents[0].value.as_deref(), Some(OTHER.as_bytes()));
        assert!(!headers.iter().any(|x| named(x, TRACESTATE)));
        assert!(headers.contains(&h("k", "v")));
    }

    /// The proxy's rule: a record that carries its own `traceparent` keeps it.
    #[test]
    fn a_client_supplied_traceparent_is_kept() {
        let mut headers = vec![h(TRACEPARENT, JAVA)];
        let ours = TraceParent::parse(OTHER.as_bytes()).unwrap();
        assert!(!inject_if_absent(
            &mut headers,
            &ours,
            &TraceState::default()
        ));
        assert_eq!(headers, vec![h(TRACEPARENT, JAVA)]);
        let mut empty = vec![];
        assert!(inject_if_absent(&mut empty, &ours, &TraceState::default()));
        assert_eq!(extract(&empty).unwrap().parent, ours);
    }

    /// Three hand-offs later the origin is the first producer's context, recorded once.
    #[test]
    fn the_origin_survives_every_hop() {
        let mut headers = vec![
            h(TRACEPARENT, JAVA),
            h(TRACESTATE, "rojo=1"),
            h(TRACESTATE, "congo=2"),
        ];
        assert_eq!(
            origin_trace_id(&headers).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        for hop in 0..3 {
            keep_origin(&mut headers);
            let mut id = [0u8; 16];
            id[15] = hop + 1;
            let hand_off = TraceParent::new(
                super::super::w3c::TraceId(id),
                super::super::w3c::SpanId([1; 8]),
                Default::default(),
            );
            inject(&mut headers, &hand_off, &TraceState::default());
        }
        let origin = extract_origin(&headers).unwrap();
        assert_eq!(origin.parent.to_string(), JAVA);
        assert_eq!(origin.state.header_value(), "rojo=1,congo=2");
        assert_eq!(
            headers
                .iter()
                .filter(|x| named(x, ORIGIN_TRACEPARENT))
                .count(),
            1
        );
        assert_eq!(headers.iter().filter(|x| named(x, TRACEPARENT)).count(), 1);
    }

    /// A valid `tracestate` at the grammar's limit: 32 members of 256-byte values (~8.5 KB).
    fn huge_state() -> String {
        (0..32)
            .map(|i| format!("k{i}={}", "v".repeat(256)))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn total(headers: &[Header]) -> usize {
        headers
            .iter()
            .map(|h| h.key.len() + h.value.as_ref().map_or(0, Vec::len))
            .sum()
    }

    /// Review 18 #2: a 200 KB invalid `traceparent` and producer-written origin headers of
    /// 200 KB are never copied; what `keep_origin` writes is rebuilt and bounded.
    #[test]
    fn keep_origin_copies_only_what_parses_and_bounds_it() {
        let garbage = "0".repeat(200_000);
        let mut headers = vec![
            h(TRACEPARENT, &garbage),
            h(ORIGIN_TRACEPARENT, &garbage),
            h(ORIGIN_TRACESTATE, &garbage),
        ];
        keep_origin(&mut headers);
        assert!(
            !headers
                .iter()
                .any(|x| named(x, ORIGIN_TRACEPARENT) || named(x, ORIGIN_TRACESTATE)),
            "invalid origin headers are removed, the invalid traceparent not copied"
        );
        assert!(rebuilt_trace_headers(&headers).is_empty());

        // A valid context with a huge state: the origin is canonical, its state capped.
        let state = huge_state();
        let mut headers = vec![
            h(TRACEPARENT, &format!(" {JAVA} ")),
            h(TRACESTATE, &state),
            h(ORIGIN_TRACEPARENT, &garbage),
        ];
        keep_origin(&mut headers);
        let origin = extract_origin(&headers).unwrap();
        assert_eq!(origin.parent.to_string(), JAVA);
        let origin_headers: Vec<Header> = headers
            .iter()
            .filter(|x| named(x, ORIGIN_TRACEPARENT) || named(x, ORIGIN_TRACESTATE))
            .cloned()
            .collect();
        assert_eq!(origin_headers[0].value.as_deref(), Some(JAVA.as_bytes()));
        assert!(
            total(&origin_headers) <= 55 + 512 + 60,
            "{}",
            total(&origin_headers)
        );
        assert!(!origin.state.is_empty(), "the left-most members are kept");
        let rebuilt = rebuilt_trace_headers(&headers);
        assert!(
            total(&rebuilt) <= 2 * (55 + 512 + 40),
            "{}",
            total(&rebuilt)
        );
    }

    /// Review 18 #3: conflicting `traceparent`s give no context to `extract`, so no origin.
    #[test]
    fn conflicting_traceparents_give_no_origin() {
        let mut headers = vec![h(TRACEPARENT, JAVA), h(TRACEPARENT, OTHER)];
        assert_eq!(extract(&headers), None);
        keep_origin(&mut headers);
        assert!(!headers.iter().any(|x| named(x, ORIGIN_TRACEPARENT)));
        assert_eq!(origin_trace_id(&headers), None);
    }

    /// Review 18 #1: `inject` never writes more than `TRACESTATE_COPY_MAX` of state.
    #[test]
    fn inject_caps_the_tracestate() {
        let state = TraceState::parse(huge_state().as_bytes()).unwrap();
        let mut headers = Vec::new();
        inject(
            &mut headers,
            &TraceParent::parse(JAVA.as_bytes()).unwrap(),
            &state,
        );
        let written = headers.iter().find(|x| named(x, TRACESTATE)).unwrap();
        assert!(written.value.as_ref().unwrap().len() <= TRACESTATE_COPY_MAX);
        let kept = TraceState::parse(written.value.as_deref().unwrap()).unwrap();
        assert_eq!(kept.iter().next(), state.iter().next(), "left-most kept");
    }

    /// A record without context gets no origin header and has no origin trace id.
    #[test]
    fn no_context_no_origin() {
        let mut headers = vec![h("k", "v")];
        keep_origin(&mut headers);
        assert_eq!(headers, vec![h("k", "v")]);
        assert_eq!(origin_trace_id(&headers), None);
    }

    proptest::proptest! {
        /// Hostile header lists never panic any reader or writer.
        #[test]
        fn hostile_headers_never_panic(
            headers in proptest::collection::vec(
                (proptest::sample::select(vec!["traceparent", "TRACEPARENT", "tracestate",
                    ORIGIN_TRACEPARENT, ORIGIN_TRACESTATE, "x"]),
                 proptest::option::of(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80))),
                0..8)
        ) {
            let mut headers: Vec<Header> = headers
                .into_iter()
                .map(|(k, v)| Header { key: k.as_bytes().to_vec(), value: v })
                .collect();
            let _ = try_extract(&headers);
            let _ = extract_origin(&headers);
            keep_origin(&mut headers);
            let _ = origin_trace_id(&headers);
        }
    }
}

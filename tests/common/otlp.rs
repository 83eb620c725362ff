//! The OTLP test receiver (`testbeds/otlp`, started by `.ci/run` as `SIDETRACK_TEST_OTLP`), for
//! the suites that read back what was exported (feature `otel`).

use std::time::{Duration, Instant};

use serde_json::Value;

/// The receiver's base URL, or `None` after printing why the test is skipped.
pub fn receiver() -> Option<String> {
    match std::env::var("SIDETRACK_TEST_OTLP") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!(
                "skipped: SIDETRACK_TEST_OTLP is not set (start testbeds/otlp/start.sh, as .ci/run does)"
            );
            None
        }
    }
}

/// The spans of `trace_id` the receiver decoded (one JSON object each), once `ready` holds or
/// after 20 s: export is batched, so spans arrive a little after the work that made them.
pub fn spans_of(base: &str, trace_id: &str, ready: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let body = ureq::get(&format!("{base}/spans?trace_id={trace_id}"))
            .call()
            .expect("receiver answers")
            .into_body()
            .read_to_string()
            .unwrap();
        let spans: Vec<Value> = body
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if ready(&spans) || Instant::now() > deadline {
            return spans;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
